"""Losses the methods add on top of MONAI's (focal + Dice for mutually exclusive organ labels)."""

from organseg.losses.cotraining import region_mask, sigmoid_rampup, soft_cross_entropy
from organseg.losses.segmentation import FocalDiceLoss, class_weights_from_counts

__all__ = [
    "FocalDiceLoss",
    "class_weights_from_counts",
    "region_mask",
    "sigmoid_rampup",
    "soft_cross_entropy",
]
