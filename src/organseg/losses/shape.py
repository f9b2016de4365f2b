"""Adversarial shape constraint losses (FocusNetV2, Gao et al. 2021).

Two constraints (``JointStage.shape_loss``): upstream's (the default; ``upstream_discriminator_loss`` and
``upstream_generator_shape_loss`` at the end of this module, ``adv_train.py``'s formulas: the autoencoder is
the discriminator, no real/fake classifier), and ours (``code_l2_bce``: shape-code distance plus a BCE
real/fake head), whose training loop (two optimisers, manual optimisation) is:

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


# ---------------------------------------------------------------- upstream's shape constraint (adv_train.py)
# The autoencoder IS the discriminator (no real/fake head): its step reconstructs both masks and pushes the
# embeddings of predicted and true masks apart; the segmenter's step pulls them together.
UPSTREAM_RECON_WEIGHT = 0.999  # D: reconstruction of sigmoid(pred) and of the true mask
UPSTREAM_PUSH_WEIGHT = 0.001  # D: minus this times the embedding distance
UPSTREAM_PUSH_FEATURE_WEIGHT = 0.2  # D: weight of each decoder feature-map distance inside it
UPSTREAM_CODE_WEIGHT = 5.0  # G: code distance; feature maps and the mask itself weigh 1


def ae_outputs(ae: nn.Module, masks: torch.Tensor, frozen: bool = False):
    """``(reconstruction probabilities, code, decoder feature maps)`` of ``masks`` [B, K, *roi]: upstream's
    ``ConvAE`` returns ``(recon, code, _, [f1, f2])``; here f1, f2, ... are the outputs of the decoder's
    conv stages, coarse first (two with the default three strides, at 1/4 and 1/2 of the ROI, as upstream's).
    ``frozen=True``: gradients reach ``masks`` but no AE parameter (``call_frozen``)."""
    x = _ae_input(masks, ae.in_channels)
    if frozen:
        code = call_frozen(ae, "encode", x)
        logits, feats = call_frozen(ae, "decode", code, x.shape[-3:], return_features=True)
    else:
        code = ae.encode(x)
        logits, feats = ae.decode(code, x.shape[-3:], return_features=True)
    return torch.sigmoid(logits), code, feats[1:]


def _pooled_mse(pairs) -> torch.Tensor:
    """MSE over all elements of all ``(a, b)`` pairs together (= MSE of the concatenation; organs with
    different ROI sizes cannot be concatenated, upstream's three equal ROIs are one batch)."""
    pairs = list(pairs)
    sse = sum(((a.float() - b.float()) ** 2).sum() for a, b in pairs)
    return sse / sum(a.numel() for a, _ in pairs)


def _distances(out_pred: list, out_true: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Code MSE and one MSE per decoder feature level between predicted and true embeddings."""
    code = _pooled_mse((p[1], t[1]) for p, t in zip(out_pred, out_true))
    levels = len(out_pred[0][2])
    feats = [_pooled_mse((p[2][j], t[2][j]) for p, t in zip(out_pred, out_true)) for j in range(levels)]
    return code, feats


def upstream_discriminator_loss(
    ae: nn.Module, pred_logits: list[torch.Tensor], true_masks: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Upstream's D step (``adv_train.calc_discriminator_loss``), one tensor per organ (logits and masks
    [N, 1, *roi_k]), predictions detached:

    ``loss_recon = 0.999 [MSE(AE(sigmoid(pred)), sigmoid(pred)) + MSE(AE(true), true)]``,
    ``loss_push = -0.001 [MSE(z_pred, z_true) + 0.2 MSE(f1_pred, f1_true) + 0.2 MSE(f2_pred, f2_true)]``,
    ``loss = loss_recon + loss_push`` (AE parameters only)."""
    probs = [torch.sigmoid(p.detach().float()) for p in pred_logits]
    trues = [t.float() for t in true_masks]
    out_p = [ae_outputs(ae, p) for p in probs]
    out_t = [ae_outputs(ae, t) for t in trues]
    recon = _pooled_mse((o[0], _ae_input(p, ae.in_channels)) for o, p in zip(out_p, probs)) + _pooled_mse(
        (o[0], _ae_input(t, ae.in_channels)) for o, t in zip(out_t, trues)
    )
    code, feats = _distances(out_p, out_t)
    loss_recon = UPSTREAM_RECON_WEIGHT * recon
    loss_push = -UPSTREAM_PUSH_WEIGHT * (code + UPSTREAM_PUSH_FEATURE_WEIGHT * sum(feats))
    return {"loss": loss_recon + loss_push, "loss_recon": loss_recon, "loss_push": loss_push}


def upstream_generator_shape_loss(
    ae: nn.Module, pred_logits: list[torch.Tensor], true_masks: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The shape part of upstream's G step (``adv_train.calc_seg_loss``'s ``loss_AE``; its real/fake term
    is 0): ``5 MSE(z_pred, z_true) + MSE(f1) + MSE(f2) + MSE(sigmoid(pred), true)``, with the AE frozen
    (gradients reach the predictions only). The segmentation part (binary focal + 0.5 binary Dice) is the
    SOS loss, added by the caller."""
    probs = [torch.sigmoid(p.float()) for p in pred_logits]
    trues = [t.float() for t in true_masks]
    out_p = [ae_outputs(ae, p, frozen=True) for p in probs]
    with torch.no_grad():
        out_t = [ae_outputs(ae, t) for t in trues]
    code, feats = _distances(out_p, out_t)
    mask = _pooled_mse(zip(probs, trues))
    loss_code = UPSTREAM_CODE_WEIGHT * code
    loss_features = sum(feats)
    return {
        "loss": loss_code + loss_features + mask,
        "loss_code": loss_code,
        "loss_features": loss_features,
        "loss_mask": mask,
    }
