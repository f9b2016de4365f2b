"""Shape prior for FocusNetV2's adversarial shape constraint: a convolutional mask autoencoder and
a real/fake head on its code.

Choices where upstream (``yhygao/focusnet-v2``) leaves the design open (it releases no AE pretraining)
or where we depart from it:

- **Spatial code, no fully connected layers.** Upstream flattens 256x1x8x8 into a 512-d vector
  (31 M parameters, nearly all in two Linear layers, tied to an 8x64x64 ROI). Here the code is a
  low-resolution tensor ``[B, code_channels, X/8, Y/8, Z/8]`` (same total stride as upstream):
  ~100x fewer parameters, any ROI size, and a shift or local dent of the mask changes the code
  locally, which keeps the code distance sensitive to small shape differences.
- **No normalisation layers, LeakyReLU(0.2).** The input is a mask in [0, 1], so activations are
  bounded without BN; BN would make a mask's code depend on whatever else is in the batch (the
  predicted and true masks are often encoded together) and on train/eval mode. LeakyReLU keeps a
  non-zero gradient everywhere, so a soft prediction always receives a shape gradient.
- **Reconstructions are logits** (train with BCE-with-logits, ``losses.shape.reconstruction_loss``),
  which is numerically safer than upstream's sigmoid + MSE.
- **An explicit discriminator head** (``ShapeDiscriminator``) on the AE code. Upstream has no
  classifier: its "discriminator" step trains the AE to reconstruct while pushing the codes of
  predicted and true masks apart (an unbounded ``-0.001 * MSE`` term). A BCE real/fake head on the
  code is the standard, bounded way to make the code separate real from predicted shapes; the
  discriminator step updates AE + head (``loss_disc`` plus a reconstruction loss so the code stays
  a shape code), the segmenter step uses ``loss_shape`` (code distance) and ``loss_adv``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from organseg.errors import ConfigError

ACT = ("leakyrelu", {"negative_slope": 0.2})


def _conv(cin: int, cout: int, kernel_size: int, stride=1, act: bool = True) -> nn.Module:
    return Convolution(
        3,
        cin,
        cout,
        strides=stride,
        kernel_size=kernel_size,
        act=ACT if act else None,
        norm=None,
        conv_only=not act,
    )


class ShapeAutoencoder(nn.Module):
    """Mask autoencoder ``[B, in_channels, X, Y, Z]`` (soft or hard masks) -> ``(recon_logits, code)``.

    Encoder: one strided conv per entry of ``strides`` (channels ``base * 2**i``), then a 1x1x1
    linear projection to ``code_channels``. Decoder: mirror image, trilinear upsampling to the
    encoder's sizes then a conv; the last conv gives ``in_channels`` logits. One AE can be shared
    by several organs (upstream: one AE for the 3 small organs, fed as a batch of single masks);
    ``losses.shape`` folds organ channels into the batch when ``in_channels == 1``.
    Everything is differentiable w.r.t. the input mask.
    """

    def __init__(
        self,
        in_channels: int = 1,
        code_channels: int = 32,
        base: int = 16,
        strides: Sequence[Sequence[int]] = ((2, 2, 2), (2, 2, 2), (2, 2, 2)),
        kernel_size: int = 3,
    ):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd, got {kernel_size}")
        self.in_channels = in_channels
        self.code_channels = code_channels
        self.strides = [tuple(int(v) for v in s) for s in strides]
        chans = [base * 2**i for i in range(len(self.strides))]
        self.encoder = nn.ModuleList(
            _conv(cin, cout, kernel_size, stride)
            for cin, cout, stride in zip([in_channels, *chans[:-1]], chans, self.strides)
        )
        self.to_code = _conv(chans[-1], code_channels, 1, act=False)
        self.from_code = _conv(code_channels, chans[-1], 1)
        # decoder stage i upsamples to the size before encoder stage i and maps chans[i] -> chans[i-1]
        self.decoder = nn.ModuleList(
            _conv(chans[i], chans[i - 1], kernel_size) for i in range(len(chans) - 1, 0, -1)
        )
        self.to_mask = _conv(chans[0], in_channels, kernel_size, act=False)

    def _sizes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Spatial sizes before each encoder stage and of the code (odd kernel, 'same' padding)."""
        sizes = [tuple(int(s) for s in shape)]
        for stride in self.strides:
            sizes.append(tuple(-(-n // s) for n, s in zip(sizes[-1], stride)))
        return sizes

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """masks [B, in_channels, X, Y, Z] in [0, 1] -> code [B, code_channels, ~X/8, ~Y/8, ~Z/8]."""
        if masks.shape[1] != self.in_channels:
            raise ValueError(f"ShapeAutoencoder expects {self.in_channels} channels, got {masks.shape[1]}")
        x = masks.float()
        for stage in self.encoder:
            x = stage(x)
        return self.to_code(x)

    def decode(
        self, code: torch.Tensor, out_shape: Sequence[int] | None = None, return_features: bool = False
    ):
        """code -> reconstruction logits [B, in_channels, *out_shape] (default: code size x strides);
        with ``return_features`` also the list of intermediate decoder feature maps (coarse first)."""
        if out_shape is None:
            out_shape = [n * f for n, f in zip(code.shape[-3:], torch.tensor(self.strides).prod(0).tolist())]
        sizes = self._sizes(out_shape)
        x = self.from_code(code)
        features = [x]
        for stage, size in zip(self.decoder, reversed(sizes[1:-1])):
            x = stage(F.interpolate(x, size=size, mode="trilinear", align_corners=False))
            features.append(x)
        logits = self.to_mask(F.interpolate(x, size=sizes[0], mode="trilinear", align_corners=False))
        return (logits, features) if return_features else logits

    def embed(self, masks: torch.Tensor) -> list[torch.Tensor]:
        """``[code, decoder features (coarse to fine)]``: the multi-level embedding compared by the
        upstream-style shape loss (upstream's segmenter step adds 5 MSE(code) + MSE(f1) + MSE(f2))."""
        code = self.encode(masks)
        _, features = self.decode(code, masks.shape[-3:], return_features=True)
        return [code, *features]

    def forward(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """masks -> (reconstruction logits, same shape as masks; code)."""
        code = self.encode(masks)
        return self.decode(code, masks.shape[-3:]), code


class ShapeDiscriminator(nn.Module):
    """Real/fake head on a ``ShapeAutoencoder`` code: conv -> LeakyReLU -> [global mean, global max]
    -> linear -> one logit per sample ``[B]`` (positive = "looks like a true mask").

    Mean and max pooling together: a mean sees global shape statistics, a max catches a single
    local defect (a hole, a spur) that a mean would dilute. Kept separate from the AE so the
    segmenter's optimiser never owns it; the discriminator optimiser takes AE + head parameters.
    """

    def __init__(self, code_channels: int, hidden: int = 32):
        super().__init__()
        self.conv = _conv(code_channels, hidden, 3)
        self.fc = nn.Linear(2 * hidden, 1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        h = self.conv(code).flatten(2)
        return self.fc(torch.cat([h.mean(-1), h.amax(-1)], dim=1)).squeeze(1)
