"""Running many cases or one case elsewhere: batch runs over folders and the worker process the Slicer module uses."""
