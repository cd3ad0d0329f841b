"""Everything that needs 3D Slicer's Python (slicer, MRML): the scene adapter, the module logic, the install flow."""
