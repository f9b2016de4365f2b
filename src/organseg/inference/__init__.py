"""Whole-volume inference (sliding window now; FocusNetV2's locate-zoom-paste comes with its issue)."""
from organseg.inference.sliding_window import predict_labels, predict_probabilities

__all__ = ["predict_labels", "predict_probabilities"]
