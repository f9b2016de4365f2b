"""FocusNetV2 as one container, so every stage's checkpoint has the same parameter names, and the one
architecture value that builds it.

Stage 1 trains ``snet``; stage 2 ``sol`` (S-Net frozen); stage 3 ``sos`` (both frozen); stage 4
pre-trains ``shape_ae`` (+ ``disc``); stage 5 fine-tunes all with the shape constraint. A later stage
loads the earlier stage's container state and trains its part; inference uses all of it.

``FocusNetArchitecture`` is what the five stages must agree on (widths, ``roi_mm``). It is given once,
in ``experiments/focusnetv2/architecture.yaml``, which every stage config composes
(``architecture: architecture.yaml``); with the data's small organs and voxel spacing it builds the
container (``build``) and is stored in, and checked against, every stage checkpoint (``record``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from organseg.errors import ConfigError
from organseg.networks.shape_autoencoder import ShapeAutoencoder, ShapeDiscriminator, UpstreamShapeAutoencoder
from organseg.networks.snet import FULL_RES_KERNELS, SNet
from organseg.networks.sol import SOLNet
from organseg.networks.sos import SOS_BRANCHES, SOSNetBank, UpstreamSOSBranch, sos_inputs
from organseg.spatial.roi import crop_rois, roi_size_voxels


class FocusNetV2(nn.Module):
    """S-Net (all organs) + SOL-Net (small-organ heatmaps) + one SOS-Net per small organ + shape AE.

    Args:
        num_classes: classes incl. background (S-Net's outputs).
        small_classes: class indices of the small organs, in the card's ``small`` order (K of them).
        roi_sizes: per small organ, the SOS ROI in voxels (x, y, z) (x, y divisible by 2).
    """

    def __init__(
        self,
        num_classes: int,
        small_classes: Sequence[int],
        roi_sizes: Sequence[Sequence[int]],
        base_channels: int = 16,
        aspp_rates: Sequence[int] = (1, 2, 3, 5),
        sol_hidden: int = 32,
        sos_base: int = 16,
        ae_code_channels: int = 32,
        ae_base: int = 16,
        snet_full_res_kernels: str = "upstream",
        sos_branch: str = "upstream",
        shape_ae: str = "upstream",
        ae_latent: int = 512,
    ):
        super().__init__()
        if len(small_classes) != len(roi_sizes):
            raise ConfigError(f"{len(small_classes)} small organs but {len(roi_sizes)} ROI sizes")
        self.num_classes = num_classes
        self.small_classes = [int(c) for c in small_classes]
        self.roi_sizes = [tuple(int(v) for v in r) for r in roi_sizes]
        self.snet = SNet(
            1,
            num_classes=num_classes,
            base_channels=base_channels,
            aspp_rates=tuple(aspp_rates),
            full_res_kernels=snet_full_res_kernels,
        )
        k = len(self.small_classes)
        self.sol = SOLNet(self.snet.feature_channels, k, hidden=sol_hidden)
        self.sos = SOSNetBank(
            k, in_channels=self.snet.feature_channels + 2, base_channels=sos_base, branch=sos_branch
        )
        self.sos_branch = sos_branch
        if sos_branch == "upstream":
            div = UpstreamSOSBranch.divisor
            bad = [r for r in self.roi_sizes if any(n % d for n, d in zip(r, div))]
            if bad:
                raise ConfigError(
                    f"ROI sizes {bad} (voxels) must be divisible by {div} for sos_branch upstream"
                )
        if shape_ae == "upstream":  # one AE for all organs, tied to their (common) ROI size
            if len(set(self.roi_sizes)) != 1:
                raise ConfigError(
                    f"shape_ae upstream needs one ROI size for all small organs, got {self.roi_sizes}"
                )
            self.shape_ae = UpstreamShapeAutoencoder(self.roi_sizes[0], 1, ae_base, ae_latent)
            self.disc = ShapeDiscriminator(ae_latent)
        else:
            self.shape_ae = ShapeAutoencoder(1, ae_code_channels, ae_base)
            self.disc = ShapeDiscriminator(ae_code_channels)

    @property
    def num_small(self) -> int:
        return len(self.small_classes)

    def snet_sol(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """image [B,1,*S] -> (S-Net logits [B,C,*S], features [B,F,*S], SOL heatmaps [B,K,*S])."""
        logits, features = self.snet.forward_features(image)
        return logits, features, self.sol(features)

    def sos_logits(
        self,
        features: torch.Tensor,
        heatmaps: torch.Tensor,
        image: torch.Tensor,
        centres: torch.Tensor,
        k: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Organ k's SOS-Net on ROIs around ``centres`` [B,3] (voxels, finite) cropped from the CT
        (``sos_branch="upstream"``) or concat(features, heatmap k, CT) -> (logits [B,1,*roi_k], ROI starts
        [B,3])."""
        x = image if self.sos_branch == "upstream" else sos_inputs(features, heatmaps[:, k : k + 1], image)
        rois, starts = crop_rois(x, centres, self.roi_sizes[k], return_starts=True)
        # CT pads with its air value, not 0 (0 is soft tissue after normalisation)
        if image.numel():
            outside = crop_rois(torch.ones_like(image[:, :1]), centres, self.roi_sizes[k]) == 0
            rois[:, -1:] = torch.where(outside, image.min().detach(), rois[:, -1:])
        return self.sos(rois, k), starts


SHAPE_AES = ("upstream", "spatial")
# upstream's SOS ROI, 8 x 64 x 64 voxels (D, H, W) at 2.5 x 1 x 1 mm, as [x, y, z] in mm
UPSTREAM_ROI_MM = (64.0, 64.0, 20.0)


@dataclass(frozen=True)
class FocusNetArchitecture:
    """The FocusNetV2 architecture every training stage must share (the container's shapes depend on
    it). Given once (``experiments/focusnetv2/architecture.yaml``); the data's small organs and voxel
    spacing complete it (they come from the dataset card, linked by the CLI, so they are not fields).

    Args:
        base_channels: S-Net width (channels of its first level).
        aspp_rates: S-Net DenseASPP in-plane dilation rates.
        sol_hidden: SOL-Net hidden channels.
        sos_base: SOS-Net width (one SOS-Net per small organ).
        ae_code_channels: shape autoencoder code channels (the discriminator's input).
        ae_base: shape autoencoder width.
        roi_mm: SOS ROI in mm, one [x, y, z] for all small organs or {organ: [x, y, z]}; converted to
            voxels with the data's spacing (``roi_size_voxels``). Default upstream's box: 64 x 64 x 8
            voxels at its 1 x 1 x 2.5 mm = 64 x 64 x 20 mm ((64, 64, 8) voxels at 1 x 1 x 3 mm,
            (32, 32, 8) at the demo's 2 x 2 x 3 mm).
        snet_full_res_kernels: S-Net's kernels at full resolution (``skip1``, ``dec2``): ``upstream``
            (3x3x3, the authors' code) or ``inplane`` (3, 3, 1), ours: nnU-Net's rule for z at 2-4x the
            in-plane spacing (upstream's 1 x 1 x 2.5 mm, the H&N cards' 1 x 1 x 3), a cheaper step
            (``networks.snet``; ``benchmarks/step_speed.py``). Part of the stored architecture.
        sos_branch: ``upstream`` (upstream's S-Net-like branch with DenseASPP on the CT crop,
            ``networks.sos.UpstreamSOSBranch``; upstream's width is ``sos_base: 32``) or ``unet`` (ours before
            issue 13: a small U-Net on [S-Net features, heatmap, CT]). A stored record without it predates
            issue 13 and means ``unet``, so older checkpoints still load.
        shape_ae: ``upstream`` (upstream's ``ConvAE``: k5 convs + BatchNorm, a fully connected ``ae_latent``-d
            code, one ROI size for all small organs; ``networks.shape_autoencoder.UpstreamShapeAutoencoder``,
            upstream's width is ``ae_base: 64``) or ``spatial`` (ours before issue 13: a spatial code of
            ``ae_code_channels``, no normalisation, any ROI size). A record without it means ``spatial``.
        ae_latent: the upstream AE's code size (upstream 512).
    """

    base_channels: int = 16
    aspp_rates: tuple[int, ...] = (1, 2, 3, 5)
    sol_hidden: int = 32
    sos_base: int = 16
    ae_code_channels: int = 32
    ae_base: int = 16
    roi_mm: tuple[float, float, float] | dict[str, tuple[float, float, float]] = UPSTREAM_ROI_MM
    snet_full_res_kernels: str = "upstream"
    sos_branch: str = "upstream"
    shape_ae: str = "upstream"
    ae_latent: int = 512

    def __post_init__(self) -> None:
        if self.shape_ae not in SHAPE_AES:
            raise ConfigError(
                f"architecture shape_ae must be one of {list(SHAPE_AES)}, got {self.shape_ae!r}"
            )
        if self.sos_branch not in SOS_BRANCHES:
            raise ConfigError(
                f"architecture sos_branch must be one of {list(SOS_BRANCHES)}, got {self.sos_branch!r}"
            )
        if self.snet_full_res_kernels not in FULL_RES_KERNELS:
            raise ConfigError(
                f"architecture snet_full_res_kernels must be one of {list(FULL_RES_KERNELS)}, "
                f"got {self.snet_full_res_kernels!r}"
            )
        # the same plain values however it was given (YAML lists, a checkpoint's dict, Python tuples)
        for f in ("base_channels", "sol_hidden", "sos_base", "ae_code_channels", "ae_base", "ae_latent"):
            object.__setattr__(self, f, int(getattr(self, f)))
        object.__setattr__(self, "aspp_rates", tuple(int(r) for r in self.aspp_rates))
        roi = self.roi_mm
        object.__setattr__(
            self,
            "roi_mm",
            {str(o): _floats(v) for o, v in roi.items()} if isinstance(roi, Mapping) else _floats(roi),
        )

    @classmethod
    def of(cls, value: FocusNetArchitecture | Mapping) -> FocusNetArchitecture:
        """``value`` itself, or the architecture its fields describe (a checkpoint's hparams hold a dict)."""
        if isinstance(value, cls):
            return value
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ConfigError(f"architecture: unknown field(s) {unknown} (fields: {names})")
        return cls(**with_legacy_defaults(value))

    def as_dict(self) -> dict:
        """The fields as plain YAML/JSON values (lists, not tuples)."""
        out = asdict(self)
        out["aspp_rates"] = list(self.aspp_rates)
        out["roi_mm"] = (
            {o: list(v) for o, v in self.roi_mm.items()}
            if isinstance(self.roi_mm, dict)
            else list(self.roi_mm)
        )
        return out

    def record(self, small_organs: Sequence[str], spacing: Sequence[float]) -> dict:
        """What stage checkpoints store and compare: the fields plus the small organs and the spacing."""
        return {
            **self.as_dict(),
            "small_organs": [str(o) for o in small_organs],
            "spacing": [float(s) for s in spacing],
        }

    def roi_mm_for(self, organ: str) -> tuple[float, float, float]:
        if isinstance(self.roi_mm, dict):
            if organ not in self.roi_mm:
                raise ConfigError(
                    f"roi_mm has no entry for small organ {organ!r} (has {sorted(self.roi_mm)})"
                )
            return self.roi_mm[organ]
        return self.roi_mm

    def roi_sizes(self, small_organs: Sequence[str], spacing: Sequence[float]) -> list[tuple[int, int, int]]:
        """Per small organ, the SOS ROI in voxels (x, y, z) at ``spacing`` (mm)."""
        return [roi_size_voxels(self.roi_mm_for(o), spacing) for o in small_organs]

    def build(
        self, classes: Sequence[str], small_organs: Sequence[str], spacing: Sequence[float]
    ) -> FocusNetV2:
        """The container for the label space ``classes`` (background first) with ``small_organs`` (names
        in ``classes``, SOL/SOS order) at voxel ``spacing`` (mm, x y z)."""
        classes = list(classes)
        return FocusNetV2(
            len(classes),
            [classes.index(o) for o in small_organs],
            self.roi_sizes(small_organs, spacing),
            base_channels=self.base_channels,
            aspp_rates=self.aspp_rates,
            sol_hidden=self.sol_hidden,
            sos_base=self.sos_base,
            ae_code_channels=self.ae_code_channels,
            ae_base=self.ae_base,
            snet_full_res_kernels=self.snet_full_res_kernels,
            sos_branch=self.sos_branch,
            shape_ae=self.shape_ae,
            ae_latent=self.ae_latent,
        )


# fields added after checkpoints were written, with the value those checkpoints were built with
# issue 13: before it, the SOS-Nets were the U-Net and the shape AE the spatial one
LEGACY_DEFAULTS = {"sos_branch": "unet", "shape_ae": "spatial", "ae_latent": 512}


def with_legacy_defaults(record: Mapping) -> dict:
    """An architecture record (a checkpoint's, or its hyperparameters) with every field added since it was
    written set to what it was built with (``LEGACY_DEFAULTS``), so older checkpoints build and compare."""
    return {**record, **{k: v for k, v in LEGACY_DEFAULTS.items() if k not in record}}


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)
