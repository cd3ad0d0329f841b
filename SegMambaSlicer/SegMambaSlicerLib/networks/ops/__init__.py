"""The Mamba machinery the networks share: selective-scan backends and the mixers built on them.

The backend names are defined here, without PyTorch, so that front ends can offer them (the command
line's ``--scan-backend``) before PyTorch is loaded.
"""

#: Environment variable that chooses the selective-scan backend when no argument does.
BACKEND_ENV_VAR = "SEGMAMBA_SCAN_BACKEND"
#: ``auto`` (fused kernels when usable, else the blocked PyTorch scan), ``torch``, ``fused``, ``reference``.
SCAN_BACKENDS = ("auto", "torch", "fused", "reference")
