"""Shape prior for FocusNetV2's adversarial shape constraint: a mask autoencoder and a real/fake head on
its code.

Two autoencoders (``FocusNetArchitecture.shape_ae``): ``UpstreamShapeAutoencoder`` (the default), upstream's
``ConvAE`` (k5 convs with BatchNorm, a fully connected 512-d code, for one ROI size), and
``ShapeAutoencoder`` (``spatial``, ours before issue 13), whose choices follow.

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


class UpstreamShapeAutoencoder(nn.Module):
    """Upstream's shape autoencoder (``model/AE3D.py`` ``ConvAE``) with this module's interface
    (``encode``, ``decode(..., return_features=True)``, ``embed``, ``forward`` -> ``(recon_logits, code)``).

    Encoder: Conv k5 (padding 2) + BatchNorm + ReLU, strides 2, 2, 1, 2, widths b, 2b, 2b, 4b (upstream
    b = 64: 64, 128, 128, 256), flattened and a Linear to a ``latent``-d code (upstream 512). Decoder: Linear
    back, ReLU, then upsample + Conv k5 (4b -> 2b) + BN + ReLU, Conv k5 (2b -> 2b) + BN + ReLU = **f1**,
    upsample + Conv k5 (2b -> b) + BN + ReLU = **f2**, upsample + Conv k5 (b -> in_channels) = the logits
    (upstream applies the sigmoid inside). ``decode(..., return_features=True)`` returns
    ``[after the Linear, f1, f2]``, the maps upstream's shape constraint compares (``losses.shape``).

    The Linear layers tie it to one ROI size (``roi_size``, x y z voxels; upstream 64 x 64 x 8): the three
    organs share it only when their ROIs are equal (upstream's case). Upsampling goes to the encoder's
    sizes (upstream: trilinear x2 with align_corners=True, the same for its 8 x 64 x 64; here
    align_corners=False to any size).
    """

    def __init__(self, roi_size, in_channels: int = 1, base: int = 64, latent: int = 512):
        super().__init__()
        self.in_channels = in_channels
        self.roi_size = tuple(int(v) for v in roi_size)
        self.strides = [2, 2, 1, 2]
        b = base
        chans = [b, 2 * b, 2 * b, 4 * b]
        self.encoder = nn.ModuleList(
            nn.Sequential(nn.Conv3d(cin, cout, 5, stride=s, padding=2), nn.BatchNorm3d(cout), nn.ReLU())
            for cin, cout, s in zip([in_channels, *chans[:-1]], chans, self.strides)
        )
        self.sizes = [self.roi_size]
        for s in self.strides:
            self.sizes.append(tuple(-(-n // s) for n in self.sizes[-1]))
        self.code_shape = (chans[-1], *self.sizes[-1])
        flat = chans[-1] * self.sizes[-1][0] * self.sizes[-1][1] * self.sizes[-1][2]
        self.fc1 = nn.Linear(flat, latent)
        self.fc2 = nn.Linear(latent, flat)

        def conv_bn(cin: int, cout: int) -> nn.Module:
            return nn.Sequential(nn.Conv3d(cin, cout, 5, padding=2), nn.BatchNorm3d(cout), nn.ReLU())

        self.dec1 = nn.Sequential(conv_bn(4 * b, 2 * b), conv_bn(2 * b, 2 * b))  # -> f1
        self.dec2 = conv_bn(2 * b, b)  # -> f2
        self.to_mask = nn.Conv3d(b, in_channels, 5, padding=2)

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """masks [B, in_channels, *roi_size] in [0, 1] -> code [B, latent]."""
        if masks.shape[1] != self.in_channels or tuple(masks.shape[2:]) != self.roi_size:
            raise ValueError(
                f"upstream shape AE takes [B, {self.in_channels}, {self.roi_size}], got {tuple(masks.shape)}"
            )
        x = masks.float()
        for stage in self.encoder:
            x = stage(x)
        return self.fc1(x.flatten(1))

    def decode(
        self, code: torch.Tensor, out_shape: Sequence[int] | None = None, return_features: bool = False
    ):
        """code [B, latent] -> reconstruction logits [B, in_channels, *roi_size] (``out_shape`` must be the
        ROI size); with ``return_features`` also ``[after the Linear, f1, f2]``."""
        if out_shape is not None and tuple(int(s) for s in out_shape) != self.roi_size:
            raise ValueError(f"upstream shape AE decodes {self.roi_size} only, asked for {tuple(out_shape)}")
        h0 = F.relu(self.fc2(code).reshape(code.shape[0], *self.code_shape))
        # the sizes after encoder stages 2 (= 3, stride 1) and 1, then the input size
        f1 = self.dec1(F.interpolate(h0, size=self.sizes[2], mode="trilinear", align_corners=False))
        f2 = self.dec2(F.interpolate(f1, size=self.sizes[1], mode="trilinear", align_corners=False))
        logits = self.to_mask(F.interpolate(f2, size=self.sizes[0], mode="trilinear", align_corners=False))
        return (logits, [h0, f1, f2]) if return_features else logits

    def embed(self, masks: torch.Tensor) -> list[torch.Tensor]:
        code = self.encode(masks)
        _, features = self.decode(code, return_features=True)
        return [code, *features]

    def forward(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encode(masks)
        return self.decode(code), code


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
        if code.dim() == 2:  # a vector code (``UpstreamShapeAutoencoder``): one voxel of ``code_channels``
            code = code[:, :, None, None, None]
        h = self.conv(code).flatten(2)
        return self.fc(torch.cat([h.mean(-1), h.amax(-1)], dim=1)).squeeze(1)
