"""Partial-label (few-organ dataset) supervision: pseudo-label merging and the marginal loss.

A few-organ dataset marks every voxel outside its own organs as 0, which there means only "not one
of *this* dataset's organs". Two ways to avoid teaching "unannotated organ = background":

- :func:`merge_pseudo_labels`: fill the unknown voxels with hard pseudo-labels of the organs the
  dataset does not annotate (self-training base of Huang et al. 2020; ground truth always wins).
- :class:`MarginalFocalDiceLoss`: the marginal loss of Shi et al. (MedIA 2021): per sample, the
  probabilities of background and of every unannotated class are summed into one "merged
  background" before the focal + Dice loss, so the net is never told *which* of those it is;
  optionally with their exclusion loss (:func:`exclusion_dice`): organs do not overlap, so an
  unannotated organ must not be predicted on an annotated organ's ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from organseg.losses.segmentation import FocalDiceLoss

# log-probability given to classes folded into the merged background: finite (a -inf would give
# 0 * -inf = nan in the focal term) and representable in float16/bfloat16 under autocast
_ABSENT_LOGP = -1.0e4


def merge_pseudo_labels(label: torch.Tensor, labeled: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """Ground truth for the annotated organs, pseudo-labels for the rest.

    Args:
        label: int [B,*S] ground truth of the sample's dataset (unannotated organs are 0).
        labeled: bool [B,C] classes the sample's dataset annotates (background included or not).
        pseudo: int [B,*S] hard pseudo-labels over the full label space.

    Returns int64 [B,*S]: ``label`` where it is an organ; elsewhere the pseudo class if that class
    is *not* annotated in the sample's dataset (its ground truth already says "not here" for its
    own organs), else 0.
    """
    if label.shape != pseudo.shape:
        raise ValueError(
            f"merge_pseudo_labels: label {tuple(label.shape)} and pseudo {tuple(pseudo.shape)} differ"
        )
    if labeled.ndim != 2 or labeled.shape[0] != label.shape[0]:
        raise ValueError(
            f"merge_pseudo_labels: labeled must be [B,C] with B={label.shape[0]}, got {tuple(labeled.shape)}"
        )
    label = label.long()
    pseudo = pseudo.long()
    num_classes = labeled.shape[1]
    if pseudo.numel() and (int(pseudo.min()) < 0 or int(pseudo.max()) >= num_classes):
        raise ValueError(
            f"merge_pseudo_labels: pseudo-labels outside [0, {num_classes}) "
            f"(range {int(pseudo.min())}..{int(pseudo.max())})"
        )
    annotated = labeled.bool().clone()
    annotated[:, 0] = True  # a pseudo "background" never changes anything
    flat = pseudo.reshape(pseudo.shape[0], -1)
    pseudo_annotated = torch.gather(annotated, 1, flat).reshape(pseudo.shape)
    fill = (label == 0) & ~pseudo_annotated
    return torch.where(fill, pseudo, label)


def marginal_log_probs(logits: torch.Tensor, labeled: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the merged distribution, still with C channels.

    Channel 0 holds log(p_bg + sum of p over the sample's unannotated classes); an annotated class
    keeps its own log-probability; an unannotated channel gets a constant ~log(0) (no gradient), so
    softmax of the result is the merged distribution and plugs into any softmax-based loss.
    """
    b, c = logits.shape[:2]
    if labeled.shape != (b, c):
        raise ValueError(f"labeled must be [B,C]=({b},{c}), got {tuple(labeled.shape)}")
    logp = torch.log_softmax(logits.float(), dim=1)
    merged = ~labeled.bool()
    merged[:, 0] = True  # the background is always part of the merged background
    view = (b, c) + (1,) * (logits.ndim - 2)
    merged_v = merged.view(view)
    absent = torch.full_like(logp, _ABSENT_LOGP)
    bg = torch.logsumexp(torch.where(merged_v, logp, absent), dim=1, keepdim=True)
    out = torch.where(merged_v, absent, logp)
    return torch.cat([bg, out[:, 1:]], dim=1)


def exclusion_targets(label: torch.Tensor, labeled: torch.Tensor) -> torch.Tensor:
    """float [B,C,*S]: the exclusion set E_c of every class, where class c must NOT be predicted.

    As the authors' released code (``expand_gt`` in MIRACLE-Center/Partially-supervised-multi-organ-
    segmentation, ``nnunet/training/loss_functions/dice_loss.py``): for a class the sample's dataset
    annotates, E_c = 1 - g_c (everywhere but its own ground truth); for an unannotated organ, E_c =
    1 - g_0 = the union of the annotated organs' ground truth (organs do not overlap); channel 0:
    1 - g_0. A label of a class declared unannotated is folded into background first (as the marginal
    loss does)."""
    b, c = labeled.shape
    target = label.long()
    known = torch.gather(labeled.bool(), 1, target.reshape(b, -1)).reshape(target.shape)
    target = torch.where(known, target, torch.zeros_like(target))
    onehot = F.one_hot(target, c).movedim(-1, 1).float()
    organs = 1.0 - onehot[:, :1]  # the annotated organs' ground truth, [B,1,*S]
    annotated = labeled.bool().clone()
    annotated[:, 0] = True
    annotated = annotated.view(b, c, *([1] * (label.ndim - 1)))
    return torch.where(annotated, 1.0 - onehot, organs.expand_as(onehot))


def exclusion_dice(
    logits: torch.Tensor, label: torch.Tensor, labeled: torch.Tensor, smooth: float = 1e-5
) -> torch.Tensor:
    """Shi et al.'s exclusion loss: the soft Dice *overlap* between each foreground class's predicted
    probability p_c = softmax(logits)_c and its exclusion set E_c (:func:`exclusion_targets`), to be
    minimised::

        L_ex = mean_{c >= 1} (2 sum p_c E_c + s) / (sum p_c + sum E_c + s)

    sums pooled over the batch's partially annotated samples and their voxels (the authors apply it to
    partially labelled images only; a fully annotated sample has no unannotated organ), background
    excluded, s = ``smooth`` (nnU-Net's 1e-5, in numerator and denominator as in the authors' code).
    No partially annotated sample in the batch: 0 (attached to ``logits``)."""
    partial = (~labeled.bool()[:, 1:]).any(dim=1)
    if not bool(partial.any()):
        return logits.sum() * 0.0
    p = torch.softmax(logits.float(), dim=1)[partial][:, 1:]
    e = exclusion_targets(label, labeled)[partial][:, 1:]
    dims = [0, *range(2, p.ndim)]
    overlap = (2.0 * (p * e).sum(dims) + smooth) / (p.sum(dims) + e.sum(dims) + smooth)
    return overlap.mean()


class MarginalFocalDiceLoss(nn.Module):
    """Marginal (merged-background) focal + Dice loss for samples from few-organ datasets.

    Same terms, weights and reductions as :class:`~organseg.losses.segmentation.FocalDiceLoss`
    (MONAI focal with softmax semantics + MONAI Dice pooled over the batch), applied to the merged
    distribution of :func:`marginal_log_probs`. When every class is annotated it *is* FocalDiceLoss.
    ``labeled`` may differ per sample (a batch mixes datasets).

    Note: an unannotated class of a sample contributes nothing to that class's Dice (its prediction
    channel is ~0 and its target is empty there), so class c's batch Dice is computed over the
    samples that annotate c plus the "absent" voxels of the others.

    ``exclusion_weight`` > 0 adds Shi et al.'s exclusion loss (:func:`exclusion_dice`, on the
    unmerged softmax) with that weight, logged as ``loss_exclusion``; the authors' code weighs it 2
    against their marginal CE + Dice (``result + 2 * ex_loss``). 0 = marginal loss only.
    """

    def __init__(
        self,
        num_classes: int,
        class_weights: Sequence[float] | None = None,
        gamma: float = 2.0,
        focal_weight: float = 1.0,
        dice_weight: float = 1.0,
        dice_include_background: bool = False,
        exclusion_weight: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.exclusion_weight = float(exclusion_weight)
        # reuse the exact MONAI pieces of the full-label loss: the merged log-probabilities are a
        # normalised distribution, so their softmax / log_softmax returns them unchanged
        self.inner = FocalDiceLoss(
            num_classes,
            class_weights=class_weights,
            gamma=gamma,
            focal_weight=focal_weight,
            dice_weight=dice_weight,
            dice_include_background=dice_include_background,
        )

    @property
    def focal(self) -> nn.Module:
        """The MONAI focal term (its ``class_weight`` buffer is what ``resolve_class_weights`` sets)."""
        return self.inner.focal

    @property
    def dice(self) -> nn.Module:
        return self.inner.dice

    def forward(
        self, logits: torch.Tensor, label: torch.Tensor, labeled: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """logits [B,C,*S]; label int [B,*S] (unannotated organs 0); labeled bool [B,C]."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} channels, expected {self.num_classes}")
        target = label.long()
        # a voxel labelled with a class its dataset claims not to annotate is inconsistent data; it is
        # folded into the merged background rather than silently trained as that organ
        known = torch.gather(labeled.bool(), 1, target.reshape(target.shape[0], -1)).reshape(target.shape)
        target = torch.where(known, target, torch.zeros_like(target))
        terms = self.inner(marginal_log_probs(logits, labeled), target)
        if self.exclusion_weight > 0:
            ex = exclusion_dice(logits, target, labeled)
            terms["loss_exclusion"] = ex
            terms["loss"] = terms["loss"] + self.exclusion_weight * ex
        return terms
