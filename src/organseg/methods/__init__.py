"""LightningModules: the baseline, one per FocusNetV2 stage; co-training WAM (CoTrainingWAM)."""

from organseg.methods.base import SegmentationModuleBase
from organseg.methods.cowam import CoTrainingWAM
from organseg.methods.focusnet_stages import JointStage, ShapeAEStage, SNetStage, SOLStage, SOSStage
from organseg.methods.unet_baseline import UNetBaseline

__all__ = [
    "SegmentationModuleBase",
    "UNetBaseline",
    "CoTrainingWAM",
    "SNetStage",
    "SOLStage",
    "SOSStage",
    "ShapeAEStage",
    "JointStage",
]
