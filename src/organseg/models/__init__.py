"""Networks: the baseline 3D U-Net (MONAI) now; S-Net, SOL-Net, SOS-Net, shape AE come with FocusNetV2."""
from organseg.models.baseline import build_unet

__all__ = ["build_unet"]
