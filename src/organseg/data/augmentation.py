"""Training-patch augmentation, configured from YAML; torchio's transform API throughout.

Spatial part (``spatial: composed``, the default): ``RandomAffineElastic``, one torchio transform that
draws scaling, rotation and (optionally) an elastic displacement and resamples *every* volume of the
sample (CT, label, SOL heatmaps, pseudo-labels) with ONE sampling grid, in one ``torch`` ``grid_sample``
call per interpolation kind (scalar images trilinear together, label maps nearest together). This is
nnU-Net's design (batchgenerators' ``SpatialTransform``: one coordinate grid per sample, affine and
elastic composed, evaluated only at the output patch's voxels). ``PatchStream`` uses it that way: it draws
the parameters first, reads from the cache only the smallest box that the patch's sampling grid covers
(the patch itself when no spatial transform is drawn, which is most samples at ``affine_p: 0.3``), and
samples the patch-sized output directly, so there is no margin crop afterwards. torchio's
``RandomAffine`` instead runs one SimpleITK resampling per channel (a NumPy -> SimpleITK -> NumPy round
trip each) over the whole margin region; it stays available as ``spatial: torchio``.

Semantics kept from ``tio.RandomAffine`` (``isotropic=False``, ``center="image"``,
``default_pad_value="minimum"``, labels padded with 0): per-axis scale factors drawn from ``scales``
(> 1 makes objects look larger), rotation angles drawn from ``[-d, d]`` around x, y, z (our [X, Y, Z]
axes, RAS world as torchio's), composed in the same order as torchio's SimpleITK transform (checked
against it in the tests), about the patch centre, in millimetres: anisotropic voxels rotate correctly.

Intensity transforms touch only the CT (``include=["image"]``), never the SOL heatmap targets,
which move with the spatial transforms like the label does. They run on the patch, not the margin region.

No random left/right flip: organs come in _l/_r classes, and a flip without swapping the labels
would teach the network the wrong side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from torchio.transforms.augmentation import RandomTransform

from organseg.errors import ConfigError

SPATIAL_MODES = ("composed", "torchio")


@dataclass(frozen=True)
class SpatialDraw:
    """One draw of ``RandomAffineElastic``: the map from output to input voxels, in voxel units.

    ``matrix`` (3x3) maps an output voxel's offset from the output centre to the input offset from the
    same physical point; ``displacement`` is the coarse elastic field in input voxels, [3, k, k, k]
    spanning the output grid, or None.
    """

    matrix: np.ndarray
    displacement: torch.Tensor | None
    max_displacement: np.ndarray  # |displacement| bound per axis, input voxels

    @property
    def is_identity(self) -> bool:
        return self.displacement is None and bool(np.array_equal(self.matrix, np.eye(3)))

    def input_box(self, out_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(start, size)`` of the smallest input box, relative to the output's first voxel when both
        grids share their centre, that holds every voxel the trilinear sampling of the output touches."""
        half = (np.asarray(out_size, float) - 1) / 2
        corners = np.array(np.meshgrid(*[(-h, h) for h in half], indexing="ij")).reshape(3, -1)
        reach = np.abs(self.matrix @ corners).max(axis=1) + self.max_displacement
        lo = np.floor(half - reach - 1e-6).astype(np.int64)
        hi = np.ceil(half + reach + 1e-6).astype(np.int64)
        return lo, hi - lo + 1


def rotation_matrix(degrees: Sequence[float]) -> np.ndarray:
    """Rotation by ``degrees`` around x, y, z in RAS world coordinates, as torchio's ``Affine``.

    torchio hands SimpleITK an ``Euler3DTransform`` with the LPS angles (-a, -b, c); its default
    order applies y, then x, then z: ``Rz(c) Rx(-a) Ry(-b)`` in LPS, which is ``Rz(c) Rx(a) Ry(b)`` in RAS
    (conjugating with diag(-1, -1, 1) flips the sign of x and y rotations, not z).
    """
    a, b, c = np.radians(np.asarray(degrees, dtype=float))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ rx @ ry


def affine_draw(
    scales: Sequence[float],
    degrees: Sequence[float],
    spacing: Sequence[float],
    displacement_mm: torch.Tensor | None = None,
) -> SpatialDraw:
    """The output -> input voxel map of a scaling + rotation about the centre, done in millimetres.

    torchio's forward transform (input -> output world) is ``S R`` (its composite applies the rotation,
    then the scaling); a resampler needs its inverse, ``R^T S^-1``, and voxel offsets are converted to mm
    and back (``D^-1 ... D``) so that a rotation of anisotropic voxels is a rotation of the anatomy.
    """
    d = np.asarray(spacing, dtype=float)
    world = rotation_matrix(degrees).T @ np.diag(1.0 / np.asarray(scales, dtype=float))
    matrix = np.diag(1.0 / d) @ world @ np.diag(d)
    if displacement_mm is None:
        return SpatialDraw(matrix, None, np.zeros(3))
    field_vox = displacement_mm / torch.as_tensor(d, dtype=displacement_mm.dtype).view(3, 1, 1, 1)
    bound = field_vox.abs().amax(dim=(1, 2, 3)).double().numpy()
    return SpatialDraw(matrix, field_vox, bound)


def _centred_theta(draw: SpatialDraw, out_size, in_size, in_centre) -> torch.Tensor:
    """``affine_grid``'s theta (normalised output -> normalised input, ``align_corners=True``), in
    grid_sample's reversed axis order (its last grid coordinate indexes our x)."""
    half_out = (np.asarray(out_size, float) - 1) / 2
    to_norm = 2.0 / np.maximum(np.asarray(in_size, float) - 1, 1)
    block = np.diag(to_norm) @ draw.matrix @ np.diag(half_out)
    shift = to_norm * np.asarray(in_centre, float) - 1
    theta = np.concatenate([block[::-1, ::-1], shift[::-1, None]], axis=1)
    return torch.as_tensor(theta.copy(), dtype=torch.float32)[None]


def resample(
    volumes: Mapping[str, torch.Tensor],
    label_maps: frozenset[str] | set[str],
    draw: SpatialDraw,
    out_size: Sequence[int],
    in_offset: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Resample every [C, X, Y, Z] volume with one grid: one ``grid_sample`` for the scalar images
    (trilinear; outside the input each channel's minimum, torchio's ``default_pad_value="minimum"``),
    one for the label maps (nearest; outside 0). The output has ``out_size`` voxels; its first voxel sits
    at ``in_offset`` input voxels (default: both grids share their centre). Output dtypes: float32 for
    scalar images, the input dtype for label maps.
    """
    names = list(volumes)
    in_size = np.asarray(next(iter(volumes.values())).shape[1:], dtype=np.int64)
    out_size = np.asarray(out_size, dtype=np.int64)
    if in_offset is None:
        in_centre = (in_size - 1) / 2
    else:
        in_centre = np.asarray(in_offset, float) + (out_size - 1) / 2
    start = in_centre - (out_size - 1) / 2
    if draw.is_identity and np.all(start == np.round(start)) and np.all(start >= 0):
        # no motion: the output is a crop of the input, bit for bit (and no interpolation cost)
        lo = start.astype(np.int64)
        box = (slice(None), *(slice(int(a), int(a + n)) for a, n in zip(lo, out_size)))
        if np.all(lo + out_size <= in_size):
            return {n: (v[box].float() if n not in label_maps else v[box]) for n, v in volumes.items()}
    theta = _centred_theta(draw, out_size, in_size, in_centre)
    grid = F.affine_grid(theta, [1, 1, *out_size.tolist()], align_corners=True)
    if draw.displacement is not None:
        dense = F.interpolate(
            draw.displacement[None].float(), size=out_size.tolist(), mode="trilinear", align_corners=True
        )[0]
        to_norm = torch.as_tensor(2.0 / np.maximum(in_size - 1, 1), dtype=torch.float32).view(3, 1, 1, 1)
        grid = grid + (dense * to_norm).flip(0).permute(1, 2, 3, 0)[None]
    out: dict[str, torch.Tensor] = {}
    for kind in ("scalar", "label"):
        group = [n for n in names if (n in label_maps) == (kind == "label")]
        if not group:
            continue
        stacked = torch.cat([volumes[n].float() for n in group])
        if kind == "scalar":
            low = stacked.amin(dim=(1, 2, 3), keepdim=True)
            moved = F.grid_sample(
                (stacked - low)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
            )[0]
            moved += low
        else:
            moved = F.grid_sample(
                stacked[None], grid, mode="nearest", padding_mode="zeros", align_corners=True
            )[0]
        for n, part in zip(group, moved.split([volumes[n].shape[0] for n in group])):
            out[n] = part if kind == "scalar" else part.to(volumes[n].dtype)
    return out


class RandomAffineElastic(RandomTransform, tio.SpatialTransform):
    """Random scaling + rotation (+ optional elastic displacement), all volumes in one resampling.

    A torchio transform (it composes in ``tio.Compose`` and takes ``include``/``exclude``); on its own it
    resamples each subject onto its own grid. ``PatchStream`` calls ``draw`` and ``resample`` itself to
    read and resample only what the patch needs (module doc).

    Args:
        scales: ``(a, b)``: per-axis factors ``s_i ~ U(a, b)`` (torchio's meaning, ``isotropic=False``).
        degrees: ``(dx, dy, dz)``: angles ``~ U(-d, d)`` around x, y, z, degrees.
        affine_p: probability of the scaling + rotation.
        elastic_p: probability of the elastic displacement (drawn independently; 0 = off).
        max_displacement: elastic bound per axis, mm (x, y, z); each control point's displacement is
            ``U(-m, m)``; the field is trilinear between ``num_control_points`` per axis over the patch
            (torchio uses cubic B-splines, nnU-Net a Gaussian-smoothed field; trilinear keeps it one
            cheap ``interpolate``), the outermost control points fixed at 0 as torchio's
            ``locked_borders=2`` does.
        num_control_points: control points per axis (>= 4).
        p: torchio's probability of running the transform at all (default 1).
    """

    def __init__(
        self,
        scales: Sequence[float] = (0.9, 1.1),
        degrees: Sequence[float] = (10.0, 10.0, 5.0),
        affine_p: float = 1.0,
        elastic_p: float = 0.0,
        max_displacement: Sequence[float] = (7.5, 7.5, 7.5),
        num_control_points: int = 7,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.scales = (float(scales[0]), float(scales[1]))
        self.degrees = tuple(float(d) for d in degrees)
        if len(self.degrees) != 3 or not 0 < self.scales[0] <= self.scales[1]:
            raise ValueError(
                f"degrees must be 3 numbers and 0 < scales[0] <= scales[1], got {degrees}, {scales}"
            )
        self.affine_p = float(affine_p)
        self.elastic_p = float(elastic_p)
        self.max_displacement = tuple(float(m) for m in max_displacement)
        self.num_control_points = int(num_control_points)
        if self.num_control_points < 4:
            raise ValueError(f"num_control_points must be >= 4, got {num_control_points}")
        self.args_names = [
            "scales",
            "degrees",
            "affine_p",
            "elastic_p",
            "max_displacement",
            "num_control_points",
        ]

    def draw(self, spacing: Sequence[float]) -> SpatialDraw | None:
        """One random draw (torch's RNG, as every torchio transform), or None: nothing to do."""
        do_affine = bool(torch.rand(1).item() < self.affine_p)
        do_elastic = bool(torch.rand(1).item() < self.elastic_p)
        if not (do_affine or do_elastic):
            return None
        scales, degrees = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
        if do_affine:
            lo, hi = self.scales
            scales = tuple((lo + (hi - lo) * torch.rand(3, dtype=torch.float64)).tolist())
            d = torch.as_tensor(self.degrees, dtype=torch.float64)
            degrees = tuple(((2 * torch.rand(3, dtype=torch.float64) - 1) * d).tolist())
        field_mm = None
        if do_elastic:
            k = self.num_control_points
            m = torch.as_tensor(self.max_displacement, dtype=torch.float32).view(3, 1, 1, 1)
            field_mm = (2 * torch.rand(3, k, k, k) - 1) * m
            inner = torch.zeros_like(field_mm)
            inner[:, 1:-1, 1:-1, 1:-1] = field_mm[:, 1:-1, 1:-1, 1:-1]
            field_mm = inner
        return affine_draw(scales, degrees, spacing, field_mm)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        images = subject.get_images_dict(intensity_only=False, include=self.include, exclude=self.exclude)
        if not images:
            return subject
        first = next(iter(images.values()))
        draw = self.draw(first.spacing)
        if draw is None:
            return subject
        labels = {n for n, im in images.items() if im.type == tio.LABEL}
        moved = resample({n: im.data for n, im in images.items()}, labels, draw, first.spatial_shape)
        for name, image in images.items():
            image.set_data(moved[name])
        return subject


def split_spatial(transform) -> tuple[RandomAffineElastic | None, tio.Transform | None]:
    """``(RandomAffineElastic, the rest)`` when ``transform`` is one or a ``tio.Compose`` starting with
    one (``PatchStream`` then resamples it on the patch region itself), else ``(None, transform)``."""
    if isinstance(transform, RandomAffineElastic):
        return transform, None
    if isinstance(transform, tio.Compose) and transform.transforms:
        first = transform.transforms[0]
        if isinstance(first, RandomAffineElastic):
            rest = list(transform.transforms[1:])
            return first, (tio.Compose(rest, copy=False) if rest else None)
    return None, transform


@dataclass
class AugmentationConfig:
    affine_p: float = 0.3  # probability of a random scale/rotation
    scales: tuple[float, float] = (0.9, 1.1)
    degrees: tuple[float, float, float] = (10.0, 10.0, 5.0)  # around x, y, z (z: in-plane rotation)
    elastic_p: float = 0.0  # probability of an elastic displacement (composed: same resampling)
    elastic_max_displacement: tuple[float, float, float] = (7.5, 7.5, 3.0)  # mm, x, y, z
    elastic_control_points: int = 7  # per axis, over the patch
    spatial: str = "composed"  # composed: one grid_sample per sample | torchio: tio.RandomAffine (+Elastic)
    noise_p: float = 0.2
    noise_std: tuple[float, float] = (0.0, 0.05)  # in normalised intensity units ([-1, 1] window)
    blur_p: float = 0.1
    blur_std: tuple[float, float] = (0.0, 0.5)  # mm
    gamma_p: float = 0.0
    extra: list = field(default_factory=list)  # further tio transforms (instances), appended

    def __post_init__(self):
        if self.spatial not in SPATIAL_MODES:
            raise ConfigError(
                f"augmentation.spatial: must be one of {list(SPATIAL_MODES)}, got {self.spatial!r}"
            )

    @classmethod
    def from_any(cls, value) -> AugmentationConfig | None:
        if value is None or value is False:
            return None
        if isinstance(value, cls):
            return value
        return cls(**dict(value))

    def margin(self, patch_size) -> list[int]:
        """Extra voxels read around a patch so rotation/scaling never pulls in padding (``spatial: torchio``;
        the composed transform reads the exact box each draw needs). Elastic displacement is counted as
        1 voxel per mm (exact for voxels of 1 mm or more; finer ones may pad at the rim)."""
        if self.affine_p <= 0 and self.elastic_p <= 0:
            return [0, 0, 0]
        angle = math.radians(max(self.degrees)) if self.affine_p > 0 else 0.0
        scale = self.scales[0] if self.affine_p > 0 else 1.0
        grow = 1.0 / scale * (abs(math.cos(angle)) + abs(math.sin(angle))) - 1.0
        elastic = self.elastic_max_displacement if self.elastic_p > 0 else (0.0, 0.0, 0.0)
        return [
            int(math.ceil(s * max(grow, 0.0) / 2)) + 1 + int(math.ceil(e))
            for s, e in zip(patch_size, elastic)
        ]

    def _spatial(self) -> list[tio.Transform]:
        if self.affine_p <= 0 and self.elastic_p <= 0:
            return []
        if self.spatial == "composed":
            return [
                RandomAffineElastic(
                    scales=self.scales,
                    degrees=self.degrees,
                    affine_p=max(self.affine_p, 0.0),
                    elastic_p=max(self.elastic_p, 0.0),
                    max_displacement=self.elastic_max_displacement,
                    num_control_points=self.elastic_control_points,
                    copy=False,
                )
            ]
        out: list[tio.Transform] = []
        if self.affine_p > 0:
            out.append(
                tio.RandomAffine(
                    scales=self.scales,
                    degrees=self.degrees,
                    isotropic=False,
                    default_pad_value="minimum",
                    p=self.affine_p,
                )
            )
        if self.elastic_p > 0:
            out.append(
                tio.RandomElasticDeformation(
                    num_control_points=self.elastic_control_points,
                    max_displacement=self.elastic_max_displacement,
                    p=self.elastic_p,
                )
            )
        return out

    def build(self) -> tio.Transform:
        transforms: list[tio.Transform] = self._spatial()
        # copy=False: the sample's subject is built for this call only, a defensive deep copy per
        # transform would only copy tensors
        if self.blur_p > 0:
            transforms.append(tio.RandomBlur(std=self.blur_std, p=self.blur_p, include=["image"], copy=False))
        if self.noise_p > 0:
            transforms.append(
                tio.RandomNoise(std=self.noise_std, p=self.noise_p, include=["image"], copy=False)
            )
        if self.gamma_p > 0:
            transforms.append(tio.RandomGamma(p=self.gamma_p, include=["image"], copy=False))
        transforms.extend(self.extra)
        return tio.Compose(transforms, copy=False)
