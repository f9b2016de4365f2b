"""Shared machinery of the synthetic CT phantoms: seeded random streams, the per-case pose and
elastic deformation, analytic primitives (ellipsoids, tubes) rasterised on local bounding boxes,
and writers for the nnU-Net raw layout (and PDDCA, used by the head-and-neck phantom).

How a case is made
------------------
Anatomy is described in a *canonical* physical space (millimetres, x = patient left, y =
posterior, z = superior, origin at the centre of the default field of view).  A case maps that
space into the scanner's world space with a random similarity transform (scale, rotation,
translation) followed by a smooth random elastic displacement ``u`` (cubic B-spline on a fixed
36 mm lattice in world space).  For every voxel centre ``x`` of the output grid we compute its
canonical coordinate ``q(x) = R^T (x + u(x) - t) / s`` once; every structure is then evaluated on
``q`` inside its own (dilated) bounding box.  Because intensity and label are painted from the
same ``q``, both see exactly the same deformation, and evaluating labels at voxel centres is the
nearest-neighbour resampling of the deformed label map.

The world grid is centred on the physical origin: ``origin = -(shape - 1) / 2 * spacing`` with an
identity direction, so any shape/spacing rasterises the same physical case.

Determinism: a case's random numbers come from ``np.random.SeedSequence([seed, generator_id,
stream, index])`` and are drawn in a fixed order (pose, organ jitter, intensities, elastic
field, and last the shape-dependent noise), so the anatomy depends only on (seed, generator,
stream, case index): never on the worker count, and not on the grid (only the noise does).

Axis convention: numpy arrays are indexed (x, y, z); SimpleITK arrays are (z, y, x) and are
transposed exactly once, in :func:`write_image`.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from scipy import ndimage

from organseg.child_processes import exit_with_parent
from organseg.errors import ConfigError
from organseg.io.atomic import make_dirs

AIR_HU = -1000.0
HU_MIN, HU_MAX = -1024, 3071

# generator ids: part of every case's seed sequence so the two phantoms never share a stream
GENERATOR_IDS = {"hn": 1, "abdomen": 2}


# ----------------------------------------------------------------------------- random streams
def case_rng(seed: int, generator: str, stream: int, index: int) -> np.random.Generator:
    """The random generator of one case: depends only on (seed, generator, stream, index)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, GENERATOR_IDS[generator], int(stream), int(index)])
    return np.random.Generator(np.random.PCG64(ss))


def jitter(rng: np.random.Generator, sd: float, limit: float, size=None):
    """Normal(0, sd) clipped to [-limit, limit]."""
    return np.clip(rng.normal(0.0, sd, size), -limit, limit)


def rotation_matrix(rx_deg: float, ry_deg: float, rz_deg: float) -> np.ndarray:
    """Rotation R = Rz @ Ry @ Rx (degrees, right-handed, about the x, y, z axes)."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# ----------------------------------------------------------------------------- grid and pose
@dataclass(frozen=True)
class Grid:
    """A voxel grid in world space: (x, y, z) shape, spacing in mm, origin of voxel (0, 0, 0)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def origin(self) -> tuple[float, float, float]:
        return tuple(-(n - 1) / 2.0 * s for n, s in zip(self.shape, self.spacing))

    def axis(self, d: int) -> np.ndarray:
        return self.origin[d] + np.arange(self.shape[d], dtype=np.float64) * self.spacing[d]

    def index_range(self, lo_mm: float, hi_mm: float, d: int) -> tuple[int, int]:
        i0 = int(math.floor((lo_mm - self.origin[d]) / self.spacing[d]))
        i1 = int(math.ceil((hi_mm - self.origin[d]) / self.spacing[d])) + 1
        return max(i0, 0), min(i1, self.shape[d])


@dataclass
class Pose:
    """Similarity transform canonical -> world: ``x = s * R @ q + t``."""

    scale: float = 1.0
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @classmethod
    def random(
        cls, rng: np.random.Generator, scale: float, shift_mm: Sequence[float], rot_deg: Sequence[float]
    ) -> Pose:
        s = 1.0 + rng.uniform(-scale, scale)
        angles = [rng.uniform(-a, a) for a in rot_deg]
        t = np.array([rng.uniform(-m, m) for m in shift_mm])
        return cls(s, rotation_matrix(*angles), t)

    def to_world(self, q: np.ndarray) -> np.ndarray:
        return self.scale * (np.asarray(q, float) @ self.rotation.T) + self.translation


def _bspline3(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    out = np.zeros_like(t)
    m1 = t < 1
    m2 = (t >= 1) & (t < 2)
    out[m1] = 2.0 / 3.0 - t[m1] ** 2 + 0.5 * t[m1] ** 3
    out[m2] = (2.0 - t[m2]) ** 3 / 6.0
    return out


@dataclass
class ElasticField:
    """Smooth displacement (mm) from cubic B-spline coefficients on a fixed world lattice.

    The lattice (``step`` mm, ``n`` nodes per axis centred on 0) does not depend on the output
    grid, so the same case deformed onto any shape/spacing is the same physical deformation.
    ``max_mm`` bounds |u| per component (B-spline weights are a partition of unity).
    """

    coeffs: np.ndarray  # (3, n, n, n)
    step: float

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        sd_mm: Sequence[float],
        max_mm: Sequence[float],
        step: float = 36.0,
        n: int = 13,
    ) -> ElasticField:
        c = rng.normal(0.0, 1.0, (3, n, n, n))
        for d in range(3):
            c[d] = np.clip(c[d] * sd_mm[d], -max_mm[d], max_mm[d])
        return cls(c, step)

    @property
    def bound(self) -> float:
        return float(np.abs(self.coeffs).max()) if self.coeffs.size else 0.0

    def evaluate(self, grid: Grid) -> list[np.ndarray]:
        n = self.coeffs.shape[1]
        nodes = (np.arange(n) - (n - 1) / 2.0) * self.step
        w = [_bspline3((grid.axis(d)[:, None] - nodes[None, :]) / self.step) for d in range(3)]
        out = []
        for c in self.coeffs:
            t = np.tensordot(w[0], c, axes=([1], [0]))  # (X, ny, nz)
            t = np.tensordot(t, w[1], axes=([1], [1]))  # (X, nz, Y)
            t = np.tensordot(t, w[2], axes=([1], [1]))  # (X, Y, Z)
            out.append(t.astype(np.float32))
        return out


# ----------------------------------------------------------------------------- primitives
class Primitive:
    """An analytic solid in canonical space: ``radius(q) <= 1`` inside (a normalised radius:
    0 at the core, 1 on the surface) and a canonical bounding box."""

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def radius(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def min_size(self) -> float:
        """Smallest half-thickness (mm): the normalised radius grows at most 1/min_size per mm."""
        raise NotImplementedError


class Ellipsoid(Primitive):
    def __init__(self, center, semi, rotation: np.ndarray | None = None):
        self.c = np.asarray(center, float)
        self.a = np.asarray(semi, float)
        self.r = np.eye(3) if rotation is None else np.asarray(rotation, float)

    def bbox(self):
        half = np.sqrt(((self.r * self.a[None, :]) ** 2).sum(axis=1))
        return self.c - half, self.c + half

    def min_size(self):
        return float(self.a.min())

    def radius(self, x, y, z):
        dx, dy, dz = x - np.float32(self.c[0]), y - np.float32(self.c[1]), z - np.float32(self.c[2])
        acc = None
        for k in range(3):  # local coordinate k = column k of R
            r = self.r[:, k]
            loc = (dx * np.float32(r[0]) + dy * np.float32(r[1]) + dz * np.float32(r[2])) * np.float32(
                1.0 / self.a[k]
            )
            acc = loc * loc if acc is None else acc + loc * loc
        return np.sqrt(acc)


class Tube(Primitive):
    """Points within a (linearly varying) radius of a polyline; ``scale`` stretches the tube's
    cross-section per canonical axis (distances are measured in q / scale)."""

    def __init__(self, points, radii, scale=(1.0, 1.0, 1.0)):
        self.p = np.asarray(points, float)
        r = np.asarray(radii, float)
        self.rad = np.full(len(self.p), float(r)) if r.ndim == 0 else r
        self.s = np.asarray(scale, float)

    def bbox(self):
        pad = self.rad.max() * self.s
        return self.p.min(axis=0) - pad, self.p.max(axis=0) + pad

    def min_size(self):
        return float(self.rad.min() * self.s.min())

    def radius(self, x, y, z):
        best = None
        s = self.s.astype(np.float32)
        qs = (x / s[0], y / s[1], z / s[2])
        ps = self.p / self.s
        for i in range(len(ps) - 1):
            a, b = ps[i], ps[i + 1]
            ab = b - a
            l2 = float(ab @ ab) or 1e-9
            t = (
                (qs[0] - np.float32(a[0])) * np.float32(ab[0])
                + (qs[1] - np.float32(a[1])) * np.float32(ab[1])
                + (qs[2] - np.float32(a[2])) * np.float32(ab[2])
            ) * np.float32(1.0 / l2)
            np.clip(t, 0.0, 1.0, out=t)
            d2 = None
            for k in range(3):
                dk = qs[k] - (np.float32(a[k]) + t * np.float32(ab[k]))
                d2 = dk * dk if d2 is None else d2 + dk * dk
            rad = np.float32(self.rad[i]) + t * np.float32(self.rad[i + 1] - self.rad[i])
            rn = np.sqrt(d2) / rad
            best = rn if best is None else np.minimum(best, rn)
        return best


Where = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Tissue:
    """How a painted region looks: ``hu`` everywhere, or ``core`` HU where the normalised radius
    is below ``split`` (e.g. bone marrow inside a cortical rim, vitreous inside the sclera)."""

    hu: float
    core: float | None = None
    split: float = 0.0


# ----------------------------------------------------------------------------- the canvas
class Canvas:
    """Intensity (HU, float32) and label (uint8) volumes painted from canonical coordinates."""

    def __init__(self, grid: Grid, pose: Pose, elastic: ElasticField | None):
        self.grid = grid
        self.pose = pose
        self.margin = (elastic.bound if elastic is not None else 0.0) + 0.75 * max(grid.spacing) + 1.0
        ax = [grid.axis(d).astype(np.float32) for d in range(3)]
        X, Y, Z = ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :]
        if elastic is not None:
            ux, uy, uz = elastic.evaluate(grid)
            wx, wy, wz = X + ux, Y + uy, Z + uz
            del ux, uy, uz
        else:
            full = np.zeros(grid.shape, np.float32)
            wx, wy, wz = X + full, Y + full, Z + full
        t = pose.translation.astype(np.float32)
        wx -= t[0]
        wy -= t[1]
        wz -= t[2]
        rt = (pose.rotation / pose.scale).astype(np.float32)  # q_c = sum_d R[d, c] (w_d - t_d) / s
        self.q = [wx * rt[0, c] + wy * rt[1, c] + wz * rt[2, c] for c in range(3)]
        del wx, wy, wz
        self.hu = np.full(grid.shape, AIR_HU, np.float32)
        self.label = np.zeros(grid.shape, np.uint8)
        self.missing: list[str] = []  # organs entirely outside the field of view

    # -- blocks
    def block(self, prim: Primitive | None) -> tuple[slice, slice, slice] | None:
        """Index box of the voxels whose warped coordinate may fall in ``prim`` (None: empty)."""
        if prim is None:
            return tuple(slice(0, n) for n in self.grid.shape)
        lo, hi = prim.bbox()
        lo = np.maximum(lo, -1e5)
        hi = np.minimum(hi, 1e5)
        corners = np.array(
            [[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
        )
        w = self.pose.to_world(corners)
        wlo, whi = w.min(axis=0) - self.margin, w.max(axis=0) + self.margin
        sl = []
        for d in range(3):
            i0, i1 = self.grid.index_range(wlo[d], whi[d], d)
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def coords(self, sl):
        return self.q[0][sl], self.q[1][sl], self.q[2][sl]

    # -- painting
    def paint(
        self,
        prims: Primitive | Iterable[Primitive],
        tissue: Tissue,
        label: int | None = 0,
        where: Where | None = None,
        bbox_from: Primitive | None = None,
    ) -> int:
        """Paint the union of ``prims`` (optionally restricted by ``where(qx, qy, qz)``).

        ``label``: the label written there (0 for unlabelled tissue, None leaves labels alone).
        Returns the number of voxels painted.
        """
        prims = [prims] if isinstance(prims, Primitive) else list(prims)
        total = 0
        for prim in prims:
            sl = self.block(bbox_from if bbox_from is not None else prim)
            if sl is None:
                continue
            qx, qy, qz = self.coords(sl)
            r = prim.radius(qx, qy, qz)
            inside = r <= 1.0
            if where is not None:
                inside &= where(qx, qy, qz)
            n = int(inside.sum())
            if not n:
                continue
            total += n
            hu = self.hu[sl]
            if tissue.core is None:
                hu[inside] = tissue.hu
            else:
                hu[inside] = np.where(r[inside] < tissue.split, tissue.core, tissue.hu)
            if label is not None:
                self.label[sl][inside] = label
        return total

    def paint_region(
        self, where: Where, tissue: Tissue, label: int | None = 0, bbox_from: Primitive | None = None
    ) -> None:
        """Paint every voxel where ``where(qx, qy, qz)`` holds (inside ``bbox_from``'s box)."""
        sl = self.block(bbox_from)
        if sl is None:
            return
        inside = where(*self.coords(sl))
        self.hu[sl][inside] = tissue.hu
        if label is not None:
            self.label[sl][inside] = label

    def add_field(self, where: Where, value: Callable, bbox_from: Primitive | None = None) -> None:
        """Add ``value(qx, qy, qz)`` to the intensity where ``where`` holds (texture)."""
        sl = self.block(bbox_from)
        if sl is None:
            return
        qx, qy, qz = self.coords(sl)
        m = where(qx, qy, qz)
        self.hu[sl][m] += value(qx, qy, qz)[m]

    def ensure_present(
        self, label: int, prims: Primitive | Iterable[Primitive], tissue: Tissue, protect: Sequence[int] = ()
    ) -> bool:
        """If ``label`` rasterised to zero voxels, give it the voxel deepest inside its solid
        (never a voxel labelled with one of ``protect``, e.g. organs rescued before).

        Returns False only when the organ lies entirely outside the field of view.
        """
        prims = [prims] if isinstance(prims, Primitive) else list(prims)
        if (self.label == label).any():
            return True
        best = None
        # a voxel centre lies within half a voxel diagonal (canonical mm) of any point of the
        # field of view: beyond that the solid does not reach into the grid at all
        reach = 0.5 * float(np.linalg.norm(self.grid.spacing)) / self.pose.scale + 0.5
        for prim in prims:
            sl = self.block(prim)
            if sl is None:
                continue
            r = prim.radius(*self.coords(sl))
            if protect:
                r = np.where(np.isin(self.label[sl], list(protect)), np.inf, r)
            k = int(np.argmin(r))
            limit = 1.0 + reach / prim.min_size()
            if r.flat[k] <= limit and (best is None or r.flat[k] < best[0]):
                idx = np.unravel_index(k, r.shape)
                best = (float(r.flat[k]), tuple(s.start + i for s, i in zip(sl, idx)))
        if best is None:
            return False
        self.label[best[1]] = label
        self.hu[best[1]] = tissue.hu if tissue.core is None else tissue.core
        return True

    # -- finishing
    def finish(self, rng: np.random.Generator, noise_sd: float, blur_mm=(0.8, 0.8, 1.0)) -> np.ndarray:
        """Slight blur (partial volume), Gaussian noise, rounding to int16 HU."""
        sigma = [b / s for b, s in zip(blur_mm, self.grid.spacing)]
        img = ndimage.gaussian_filter(self.hu, sigma=sigma, truncate=3.0)
        img += rng.standard_normal(self.grid.shape, dtype=np.float32) * np.float32(noise_sd)
        np.clip(img, HU_MIN, HU_MAX, out=img)
        return np.rint(img).astype(np.int16)


def smooth_texture(rng: np.random.Generator, amp: float, wavelength_mm: float, n: int = 6):
    """A smooth random scalar field of canonical coordinates (sum of ``n`` plane waves with
    amplitude ``amp`` in total; its parameters are drawn now, so it is grid-independent)."""
    k = rng.normal(size=(n, 3))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    k *= 2 * np.pi / (wavelength_mm * rng.uniform(0.7, 1.4, (n, 1)))
    phase = rng.uniform(0, 2 * np.pi, n)
    a = amp / np.sqrt(n / 2.0)

    def field_(x, y, z):
        out = np.zeros(x.shape, np.float32)
        for kk, ph in zip(k, phase):
            out += np.cos(
                x * np.float32(kk[0]) + y * np.float32(kk[1]) + z * np.float32(kk[2]) + np.float32(ph)
            )
        return out * np.float32(a)

    return field_


# ----------------------------------------------------------------------------- writing
def sitk_image(arr: np.ndarray, grid: Grid):
    """A SimpleITK image from an (x, y, z) array with the grid's geometry (identity direction)."""

    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in grid.spacing))
    img.SetOrigin(tuple(float(o) for o in grid.origin))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return img


def write_image(arr: np.ndarray, grid: Grid, path: Path) -> None:
    """Write an (x, y, z) array with gzip compression.  SimpleITK's gzip streams carry no
    timestamp (mtime 0), so equal arrays give byte-identical files (tested)."""

    make_dirs(path.parent)
    sitk.WriteImage(sitk_image(arr, grid), str(path), True)


@dataclass
class PhantomCase:
    """One generated case: (x, y, z) arrays, the grid they live on, and bookkeeping."""

    case_id: str
    image: np.ndarray  # int16 HU
    label: np.ndarray  # uint8, value = class index
    grid: Grid
    classes: list[str]
    missing: list[str]  # organs outside the field of view (empty for sane grids)


def check_args(cases: int, shape, spacing) -> None:
    if int(cases) < 1:
        raise ConfigError(f"--cases must be at least 1, got {cases}")
    if len(shape) != 3 or min(int(n) for n in shape) < 1:
        raise ConfigError(f"--shape must be three positive integers, got {list(shape)}")
    if len(spacing) != 3 or min(float(s) for s in spacing) <= 0 or not all(map(math.isfinite, spacing)):
        raise ConfigError(f"--spacing must be three positive numbers (mm), got {list(spacing)}")


@dataclass
class CaseResult:
    case_id: str
    counts: dict[str, int]
    missing: list[str]
    files: list[str]


def label_counts(label: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    bc = np.bincount(label.ravel(), minlength=len(classes))
    return {name: int(bc[i]) for i, name in enumerate(classes)}


def write_dataset_json(out: Path, name: str, labels: dict[str, int], num_training: int, extra: dict) -> Path:
    doc = {
        "name": name,
        "description": extra.get("description", ""),
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": int(num_training),
        "file_ending": ".nii.gz",
        "organseg": {k: v for k, v in extra.items() if k != "description"},
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def remove_stale_cases(out: Path, tag: str, keep_ids: set[str]) -> list[Path]:
    """Remove nnU-Net case files of an earlier phantom run with the same tag that this run does
    not rewrite (only when DIR/dataset.json says an organseg phantom wrote it)."""
    meta = out / "dataset.json"
    try:
        if "organseg" not in json.loads(meta.read_text()):
            return []
    except (OSError, ValueError):
        return []
    pat = re.compile(rf"^({re.escape(tag)}_\d+)(_0000)?\.nii\.gz$")
    removed = []
    for sub in ("imagesTr", "labelsTr"):
        d = out / sub
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            m = pat.match(f.name)
            if m and m.group(1) not in keep_ids:
                f.unlink()
                removed.append(f)
    return removed


def run_cases(
    worker: Callable, jobs: list[tuple], workers: int, description: str, quiet: bool = False
) -> list:
    """Run ``worker(*job)`` for every job (in a spawn process pool when workers > 1) with a rich
    progress bar; results come back in job order.  Results never depend on ``workers``."""

    results: list = [None] * len(jobs)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=quiet, transient=False) as progress:
        task = progress.add_task(description, total=len(jobs))
        if workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                results[i] = worker(*job)
                progress.advance(task)
        else:
            with ProcessPoolExecutor(
                max_workers=min(workers, len(jobs)),
                mp_context=mp.get_context("spawn"),
                initializer=_worker_init,
                initargs=(os.getpid(),),
            ) as pool:
                futures = {pool.submit(worker, *job): i for i, job in enumerate(jobs)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    progress.advance(task)
    return results


def _worker_init(parent_pid: int | None = None) -> None:
    exit_with_parent(parent_pid)  # a killed `organseg phantom` must not leave its workers running
    try:
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    except Exception:  # pragma: no cover - best effort
        pass


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))
