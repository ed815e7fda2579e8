"""Networks MONAI lacks: our Conv3D block network and a slice-by-slice wrapper for 2D nets."""
