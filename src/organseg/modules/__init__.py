"""LightningModules: the baseline, one per FocusNetV2 stage; co-training WAM (CoTrainingWAM)."""
from organseg.modules.base import SegmentationModuleBase
from organseg.modules.baseline import UNetBaseline
from organseg.modules.cowam import CoTrainingWAM
from organseg.modules.focusnet import JointStage, ShapeAEStage, SNetStage, SOLStage, SOSStage

__all__ = ["SegmentationModuleBase", "UNetBaseline", "CoTrainingWAM", "SNetStage", "SOLStage", "SOSStage",
           "ShapeAEStage", "JointStage"]
