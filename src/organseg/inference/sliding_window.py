"""Gaussian-blended sliding-window inference over a whole cached case (MONAI's implementation)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference


@torch.no_grad()
def predict_probabilities(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Softmax probabilities [B,C,*S] for ``image`` [B,1,*S]; windows blended with a Gaussian
    (nnU-Net style) so window borders do not show. Windows run on ``device``; the stitched output
    stays on the image's device (CPU for big volumes)."""
    logits = sliding_window_inference(
        image,
        roi_size=list(roi_size),
        sw_batch_size=sw_batch_size,
        predictor=predictor,
        overlap=overlap,
        mode="gaussian",
        padding_mode="constant",
        cval=float(image.min()),
        sw_device=device,
        device=image.device,
        progress=progress,
    )
    return torch.softmax(logits, dim=1)


@torch.no_grad()
def predict_labels(predictor, image: torch.Tensor, roi_size, **kwargs) -> torch.Tensor:
    """Label map [B,*S] (uint8) = argmax of the blended probabilities."""
    return predict_probabilities(predictor, image, roi_size, **kwargs).argmax(1).to(torch.uint8)
