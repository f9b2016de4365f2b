"""Whole-volume inference: Gaussian sliding window (baseline) and FocusNetV2's locate-zoom-paste."""

from organseg.inference.locate_zoom_paste import predict_focusnet
from organseg.inference.sliding_window import predict_labels, predict_probabilities

__all__ = ["predict_focusnet", "predict_labels", "predict_probabilities"]
