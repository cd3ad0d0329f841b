"""Files in and out: images (NIfTI, NRRD, MHA, DICOM series), .seg.nrrd, reports, geometry, one atomic writer."""
