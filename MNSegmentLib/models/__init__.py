"""Models: the pretrained 2D network, the 3D network, their weights and moving between 3D patches and 2D slices."""
