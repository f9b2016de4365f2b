"""organseg: organ-at-risk segmentation experiments on PyTorch Lightning."""

__version__ = "0.1.0"
