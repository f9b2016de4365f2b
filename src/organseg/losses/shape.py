"""Adversarial shape constraint losses (FocusNetV2, Gao et al. 2021): shape-code distance and GAN losses.

Training loop this is written for (two optimisers, manual optimisation):

- discriminator step (AE + ``ShapeDiscriminator`` parameters; predictions detached):
  ``adversarial_losses(disc(ae.encode(true)), disc(ae.encode(pred.detach())))["loss_disc"]
  + reconstruction_loss(ae, true) (+ on pred)``;
- segmenter step (segmenter parameters only):
  ``shape_loss(ae, pred, true)`` (-> ``loss_shape``) ``+ adversarial_losses(None,
  discriminator_logits(ae, disc, pred))["loss_adv"]``, with the shape networks frozen.

"Frozen" here means ``torch.func.functional_call`` with detached parameter copies, not toggling
``requires_grad``: the modules are not mutated (safe under DDP hooks, threads, and an exception
mid-step), the gradient still flows through the network into the prediction, and the AE/head
parameters get no ``.grad`` at all, so the segmenter step cannot leak into the discriminator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from organseg.errors import ConfigError


class _Method(nn.Module):
    """Lets ``functional_call`` run a method other than ``forward``."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args, **kwargs):
        return getattr(self.module, self.method)(*args, **kwargs)


def call_frozen(module: nn.Module, method: str, *args, **kwargs):
    """``module.<method>(*args, **kwargs)`` with detached parameters: differentiable w.r.t. the
    inputs, no gradient (and no graph) for the module's parameters. Buffers are used as they are."""
    params = {f"module.{name}": p.detach() for name, p in module.named_parameters()}
    return functional_call(_Method(module, method), params, args, kwargs)


def _ae_input(masks: torch.Tensor, in_channels: int) -> torch.Tensor:
    """[B, K, *S] -> what the AE takes: unchanged if K == in_channels; K single-organ masks folded
    into the batch ([B*K, 1, *S]) for a shared single-channel AE (upstream's one AE for 3 organs)."""
    masks = masks.float()
    if masks.shape[1] == in_channels:
        return masks
    if in_channels == 1:
        return masks.reshape(-1, 1, *masks.shape[2:])
    raise ValueError(f"masks have {masks.shape[1]} channels; the autoencoder takes {in_channels}")


def _embed(ae, masks: torch.Tensor, kind: str, detach_ae: bool) -> list[torch.Tensor]:
    method = {"code_l2": "encode", "features": "embed", "recon": "forward"}[kind]
    out = call_frozen(ae, method, masks) if detach_ae else getattr(ae, method)(masks)
    if kind == "code_l2":
        return [out]
    if kind == "recon":
        return [torch.sigmoid(out[0])]
    return out


def shape_loss(
    ae: nn.Module,
    pred_probs: torch.Tensor,
    true_onehot: torch.Tensor,
    kind: str = "code_l2",
    detach_ae: bool = True,
    code_weight: float = 5.0,
) -> torch.Tensor:
    """Distance between the shape-AE embeddings of predicted and true masks (``loss_shape``).

    ``pred_probs`` / ``true_onehot``: [B, K, *roi] (probabilities / one-hot or binary masks). Zero
    for identical masks; grows as the prediction deforms. ``kind``:

    - ``code_l2``: MSE between the codes (the paper's code distance; default);
    - ``features``: ``code_weight * MSE(code) + sum MSE(decoder features)``, upstream's G-step term
      ``5 MSE(z) + MSE(f1) + MSE(f2)`` (upstream adds ``MSE(pred, gt)`` on the masks themselves);
    - ``recon``: MSE between the sigmoid reconstructions (a shape-projected mask distance).

    ``detach_ae=True`` (default, the segmenter step): gradients reach ``pred_probs`` through the AE
    but no AE parameter gets one (``call_frozen``), and the true branch runs without a graph.
    With ``detach_ae=False`` the AE gets gradients from both branches; upstream's discriminator
    "push apart" term is ``-shape_loss(ae, pred.detach(), true, "features", detach_ae=False)``.
    """
    if kind not in ("code_l2", "features", "recon"):
        raise ConfigError(f"shape_loss: unknown kind {kind!r} (code_l2, features, recon)")
    if pred_probs.shape != true_onehot.shape:
        raise ValueError(
            f"pred {tuple(pred_probs.shape)} and true {tuple(true_onehot.shape)} differ in shape"
        )
    pred = _ae_input(pred_probs, ae.in_channels)
    true = _ae_input(true_onehot, ae.in_channels)
    emb_pred = _embed(ae, pred, kind, detach_ae)
    if detach_ae:
        with torch.no_grad():
            emb_true = _embed(ae, true, kind, detach_ae=False)
    else:
        emb_true = _embed(ae, true, kind, detach_ae=False)
    terms = [F.mse_loss(p, t) for p, t in zip(emb_pred, emb_true)]
    if kind == "features":
        return code_weight * terms[0] + sum(terms[1:])
    return terms[0]


def reconstruction_loss(ae: nn.Module, masks: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits between ``ae(masks)`` and the masks themselves (soft targets allowed): AE
    pretraining on true ROI masks (upstream's README names only a reconstruction loss; no recipe) and the
    reconstruction part of the discriminator step."""
    x = _ae_input(masks, ae.in_channels)
    recon, _ = ae(x)
    return F.binary_cross_entropy_with_logits(recon, x)


def discriminator_logits(
    ae: nn.Module, disc: nn.Module, masks: torch.Tensor, frozen: bool = False
) -> torch.Tensor:
    """Real/fake logits ``disc(ae.encode(masks))`` ([B*K] for a shared single-channel AE).
    ``frozen=True`` for the segmenter step: gradient into ``masks`` only."""
    x = _ae_input(masks, ae.in_channels)
    if frozen:
        return call_frozen(disc, "forward", call_frozen(ae, "encode", x))
    return disc(ae.encode(x))


def adversarial_losses(
    disc_logits_real: torch.Tensor | None, disc_logits_fake: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Standard non-saturating GAN losses with BCE-with-logits:

    - ``loss_disc`` = ``(BCE(real, 1) + BCE(fake, 0)) / 2``: the discriminator's loss (compute
      ``disc_logits_fake`` from detached predictions for it); omitted when ``disc_logits_real`` is None;
    - ``loss_adv`` = ``BCE(fake, 1)``: the segmenter's loss, low when its masks look real
      (non-saturating: strong gradients exactly when the discriminator wins).
    """
    fake = disc_logits_fake.float()
    out = {"loss_adv": F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))}
    if disc_logits_real is not None:
        real = disc_logits_real.float()
        out["loss_disc"] = 0.5 * (
            F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        )
    return out
