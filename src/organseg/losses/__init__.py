"""Losses the methods add on top of MONAI's (focal + Dice for mutually exclusive organ labels)."""
from organseg.losses.segmentation import FocalDiceLoss, class_weights_from_counts

__all__ = ["FocalDiceLoss", "class_weights_from_counts"]
