"""Networks (``nn.Module``s, no training logic): the baseline 3D U-Net (MONAI), FocusNetV2's S-Net, SOL-Net,
SOS-Net and shape autoencoder with their container, and the weight average used by co-training."""

from organseg.networks.unet import build_unet

__all__ = ["build_unet"]
