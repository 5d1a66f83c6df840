"""MNSegment engine: few-label 3D segmentation by co-training a pretrained 2D network with a 3D network."""

__version__ = "0.1.0"
