"""``python -m SegMambaSlicerLib.cli``: the same as the ``segmamba-slicer`` command."""

import sys

from . import main

sys.exit(main())
