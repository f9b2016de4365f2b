"""LightningModules: the baseline now; one per FocusNetV2 stage and co-training WAM later."""
from organseg.modules.base import SegmentationModuleBase
from organseg.modules.baseline import UNetBaseline

__all__ = ["SegmentationModuleBase", "UNetBaseline"]
