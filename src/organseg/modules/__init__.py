"""LightningModules: the baseline, one per FocusNetV2 stage; co-training WAM later."""
from organseg.modules.base import SegmentationModuleBase
from organseg.modules.baseline import UNetBaseline
from organseg.modules.focusnet import JointStage, ShapeAEStage, SNetStage, SOLStage, SOSStage

__all__ = ["SegmentationModuleBase", "UNetBaseline", "SNetStage", "SOLStage", "SOSStage", "ShapeAEStage",
           "JointStage"]
