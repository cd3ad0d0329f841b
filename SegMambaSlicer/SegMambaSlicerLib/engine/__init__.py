"""One case, images in → label map out: the pipeline, the recipes (SegMamba, nnU-Net), sliding windows, devices."""
