"""What MONAI lacks, by module: blocks (our conv blocks and the Conv3D block network), teaching (the classic U-Net
course networks, valid convolutions and mirror padding among them), slicewise (a 2D net applied slice by slice) and
weights (Kaiming initialisation, weights copied from a local checkpoint)."""
