"""Image geometry: SimpleITK <-> numpy (x, y, z), resampling, and undoing the cache's preprocessing.

This module (with ``organseg.io.layouts``) is the ONLY place where SimpleITK's (z, y, x) arrays are
transposed to organseg's (x, y, z) convention; use :func:`image_to_xyz` / :func:`xyz_to_image`
everywhere else. Spacing / origin tuples are (x, y, z) in mm; ``direction`` is SimpleITK's row-major
3x3 direction cosine matrix (9 floats, columns = the x, y, z index axes in physical LPS space).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from organseg.errors import ConfigError

INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,  # cubic B-spline (may overshoot: clip afterwards)
}

#: relative tolerance when comparing two grids (spacing; origin relative to the spacing; direction absolute)
GEOMETRY_RTOL = 1e-3


@dataclass(frozen=True)
class Geometry:
    """The physical grid of a 3D image (all (x, y, z))."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 floats, row-major
    shape: tuple[int, int, int]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
            shape=tuple(int(v) for v in image.GetSize()),
        )

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Stamp spacing/origin/direction onto ``image`` (whose size must be ``shape``)."""
        if tuple(image.GetSize()) != tuple(self.shape):
            raise ValueError(f"image size {image.GetSize()} != geometry shape {self.shape}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def mismatch(self, other: Geometry, rtol: float = GEOMETRY_RTOL) -> str | None:
        """A short description of how ``other`` differs from this grid, or None if they agree."""
        if tuple(self.shape) != tuple(other.shape):
            return f"shape {tuple(self.shape)} vs {tuple(other.shape)}"
        a, b = np.asarray(self.spacing), np.asarray(other.spacing)
        if np.any(np.abs(a - b) > rtol * np.abs(a)):
            return f"spacing {_fmt(a)} vs {_fmt(b)}"
        tol = rtol * float(np.max(np.abs(a)))  # origins compared relative to the voxel size
        oa, ob = np.asarray(self.origin), np.asarray(other.origin)
        if np.any(np.abs(oa - ob) > tol):
            return f"origin {_fmt(oa)} vs {_fmt(ob)}"
        da, db = np.asarray(self.direction), np.asarray(other.direction)
        if np.any(np.abs(da - db) > rtol):
            return f"direction {_fmt(da)} vs {_fmt(db)}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "shape": list(self.shape),
        }


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(x):.6g}" for x in v) + ")"


# ---------------------------------------------------------------------------------- array <-> image
def image_to_xyz(image: sitk.Image) -> np.ndarray:
    """A 3D SimpleITK image as a C-contiguous numpy array indexed (x, y, z)."""
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0))


def xyz_to_image(
    array_xyz: np.ndarray, geometry: Geometry | Mapping[str, Any] | sitk.Image | None = None
) -> sitk.Image:
    """A numpy (x, y, z) array as a SimpleITK image, optionally with the grid of ``geometry``
    (a :class:`Geometry`, a mapping with spacing/origin/direction, or a reference image)."""
    array_xyz = np.asarray(array_xyz)
    if array_xyz.ndim != 3:
        raise ValueError(f"expected a 3D (x, y, z) array, got shape {array_xyz.shape}")
    if array_xyz.dtype == np.bool_:
        array_xyz = array_xyz.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    if geometry is None:
        return image
    if isinstance(geometry, sitk.Image):
        image.CopyInformation(geometry)
        return image
    if isinstance(geometry, Geometry):
        spacing, origin, direction = geometry.spacing, geometry.origin, geometry.direction
    else:
        spacing, origin, direction = geometry["spacing"], geometry["origin"], geometry["direction"]
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in np.asarray(direction, dtype=float).ravel()))
    return image


# ---------------------------------------------------------------------------------- resampling
def resampled_size(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple:
    """Number of voxels covering the same physical extent at ``target_spacing`` (at least 1)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


def resample_to_grid(
    image: sitk.Image,
    size: Sequence[int],
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[float],
    interpolation: str = "linear",
    default_value: float = 0.0,
    pixel_type: int | None = None,
) -> sitk.Image:
    """Resample ``image`` onto an explicit physical grid (SimpleITK ResampleImageFilter); the output has
    ``pixel_type`` (default: the input's)."""
    if interpolation not in INTERPOLATORS:
        raise ConfigError(f"interpolation must be one of {sorted(INTERPOLATORS)}, got {interpolation!r}")
    f = sitk.ResampleImageFilter()
    f.SetSize([int(v) for v in size])
    f.SetOutputSpacing([float(v) for v in spacing])
    f.SetOutputOrigin([float(v) for v in origin])
    f.SetOutputDirection([float(v) for v in np.asarray(direction, dtype=float).ravel()])
    f.SetInterpolator(INTERPOLATORS[interpolation])
    f.SetDefaultPixelValue(float(default_value))
    f.SetOutputPixelType(image.GetPixelID() if pixel_type is None else pixel_type)
    f.SetTransform(sitk.Transform())
    return f.Execute(image)


def same_spacing(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two spacings agree to 1e-6 relative: an image already at the target spacing is only cast."""
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-6, atol=0))


def resample_image(
    image: sitk.Image,
    target_spacing: Sequence[float],
    interpolation: str = "linear",
    default_value: float = -1024.0,
    pixel_type: int | None = None,
) -> sitk.Image:
    """Resample an intensity image to ``target_spacing`` keeping its origin and direction
    (``linear`` or ``bspline``). Voxels outside the input get ``default_value`` (air). ``pixel_type``: the
    output's SimpleITK pixel type (default: the input's); at the same spacing the image is only cast."""
    if interpolation not in ("linear", "bspline", "nearest"):
        raise ConfigError(f"interpolation must be linear or bspline, got {interpolation!r}")
    if same_spacing(image.GetSpacing(), target_spacing):
        if pixel_type is None or pixel_type == image.GetPixelID():
            return image
        return sitk.Cast(image, pixel_type)
    size = resampled_size(image.GetSize(), image.GetSpacing(), target_spacing)
    return resample_to_grid(
        image,
        size,
        target_spacing,
        image.GetOrigin(),
        image.GetDirection(),
        interpolation,
        default_value,
        pixel_type=pixel_type,
    )


def resample_label(label: sitk.Image, target_spacing: Sequence[float]) -> sitk.Image:
    """Resample a label map to ``target_spacing`` (nearest neighbour) keeping origin and direction."""
    if same_spacing(label.GetSpacing(), target_spacing):
        return label
    size = resampled_size(label.GetSize(), label.GetSpacing(), target_spacing)
    return resample_to_grid(
        label, size, target_spacing, label.GetOrigin(), label.GetDirection(), "nearest", 0
    )


def resample_xyz(
    array_xyz: np.ndarray,
    geometry: Geometry,
    target_spacing: Sequence[float],
    interpolation: str = "linear",
    default_value: float = 0.0,
) -> tuple[np.ndarray, Geometry]:
    """numpy convenience wrapper: resample an (x, y, z) array on ``geometry`` to ``target_spacing``."""
    image = xyz_to_image(array_xyz, geometry)
    if interpolation == "nearest":
        out = resample_label(image, target_spacing)
    else:
        out = resample_image(image, target_spacing, interpolation, default_value)
    return image_to_xyz(out), Geometry.of(out)


# ---------------------------------------------------------------------------------- undo the cache
def cropped_origin(
    origin: Sequence[float], direction: Sequence[float], spacing: Sequence[float], start: Sequence[int]
) -> tuple[float, float, float]:
    """Physical position of voxel ``start`` of a grid (the origin of a crop starting there)."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    o = np.asarray(origin, dtype=float) + d @ (np.asarray(start, float) * np.asarray(spacing, float))
    return tuple(float(v) for v in o)


def restore_original_geometry(
    label_xyz: np.ndarray, geometry: Mapping[str, Any], interpolation: str = "nearest"
) -> sitk.Image:
    """Undo the cache's preprocessing for an array on the cached (cropped, resampled) grid.

    ``geometry`` is a case's cache attributes (``CacheReader.geometry(case_id)`` or the HDF5 group's
    attrs): ``spacing`` (target), ``crop_start``/``crop_stop``, ``resampled_origin``/``resampled_shape``
    and ``orig_spacing``/``orig_origin``/``orig_direction``/``orig_shape``. The array is padded with 0
    back to the full resampled grid, then resampled (nearest neighbour for labels) onto the original
    grid. Returns a SimpleITK image with exactly the original size, spacing, origin and direction.
    """
    arr = np.asarray(label_xyz)
    start = np.asarray(geometry["crop_start"], dtype=int)
    stop = np.asarray(geometry["crop_stop"], dtype=int)
    full_shape = tuple(int(v) for v in geometry["resampled_shape"])
    if arr.ndim != 3 or tuple(arr.shape) != tuple(int(v) for v in stop - start):
        raise ValueError(
            f"array shape {arr.shape} does not match the cached crop {tuple(int(v) for v in stop - start)}"
        )
    full = np.zeros(full_shape, dtype=arr.dtype if arr.dtype != np.bool_ else np.uint8)
    full[tuple(slice(int(a), int(b)) for a, b in zip(start, stop))] = arr
    direction = tuple(float(v) for v in np.asarray(geometry["orig_direction"], float).ravel())
    src = xyz_to_image(
        full, {"spacing": geometry["spacing"], "origin": geometry["resampled_origin"], "direction": direction}
    )
    orig_shape = [int(v) for v in geometry["orig_shape"]]
    orig_spacing = [float(v) for v in geometry["orig_spacing"]]
    orig_origin = [float(v) for v in geometry["orig_origin"]]
    same_grid = (
        list(full_shape) == orig_shape
        and same_spacing(geometry["spacing"], orig_spacing)
        and np.allclose(
            np.asarray(geometry["resampled_origin"], float),
            orig_origin,
            rtol=0,
            atol=1e-6 * max(orig_spacing),
        )
    )
    if same_grid:
        src.SetSpacing(orig_spacing)
        src.SetOrigin(orig_origin)
        return src
    return resample_to_grid(src, orig_shape, orig_spacing, orig_origin, direction, interpolation, 0)
