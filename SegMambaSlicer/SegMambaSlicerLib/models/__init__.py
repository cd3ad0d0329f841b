"""What a model is: cards (parse, validate), the registry, checkpoints, downloads, the cache folder, nnU-Net result folders."""
