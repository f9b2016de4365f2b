"""FocusNetV2 whole-volume inference: locate (S-Net + SOL-Net), zoom (SOS-Net ROIs), paste.

``predict_focusnet(model, image)`` runs, on one CT ``image`` [1, 1, X, Y, Z] of any size:

1. **S-Net + SOL-Net over the whole volume** by Gaussian-blended sliding windows on exactly MONAI's
   window grid and weights (``dense_patch_slices``, ``compute_importance_map(mode="gaussian",
   sigma_scale=0.125)``), but streamed in z (``blend_slabs``): the windows are run one z-start at a
   time, and their weighted logits + heatmaps are summed into a buffer only ``patch_z`` slices deep.
   When the next z-start is reached, the slices before it can receive no more windows; they are
   normalised (``/ sum of weights``), their S-Net argmax is written into the uint8 label map, each
   small organ's heatmap maximum (value, voxel, and the six neighbours needed for sub-voxel
   refinement) is updated, and the buffer is shifted. No full-resolution float volume per class
   (nor per heatmap) is ever held; the result equals MONAI's ``sliding_window_inference`` on the full
   volume up to float summation order (the windows covering a voxel are added in another order).
2. **SOL centres**: each organ's peak of the *blended* heatmap, refined per axis by the three-point
   log-parabola (Gaussian) estimator of ``decode_centres`` (same rule: no refinement on the volume
   border), so the centres equal ``decode_centres`` on the full blended heatmap. Absent (NaN,
   ``found=False``) unless ``peak > threshold``.
3. **SOS**: for each found organ k, S-Net + SOL-Net are re-run on ONE window around the centre
   (``patch_size``, enlarged to hold organ k's ROI, shifted to lie inside the volume), and
   ``model.sos_logits`` crops the ROI from concat(features, heatmap k, CT) at the centre in window
   coordinates; ``sigmoid > 0.5`` is pasted with ``paste_roi`` at the ROI start in volume coordinates
   (by the ``merge`` rule of step 4; ROI parts outside the volume are dropped). Organs are pasted in
   ``small_classes`` order, so where two ROIs overlap the later organ's mask wins.
4. **Merge** (``merge``) of S-Net's label map and the SOS masks:

   - ``"upstream"`` (default): S-Net's argmax over all classes is kept as it is and each SOS mask is laid
     over it: only the voxels SOS calls organ k change (to k). Upstream writes the SOS result into a
     separate map (its small-organ Dice is read from that map, every other organ's from S-Net's); laying
     it over S-Net's map changes no label outside the SOS masks, so no S-Net voxel becomes another class;
   - ``"replace_in_roi"`` (ours; ``small_organs_from: snet_and_sos`` before issue 13): as ``upstream``,
     and S-Net's organ-k voxels inside organ k's ROI that SOS does not confirm become background;
   - ``"runner_up"`` (ours; ``small_organs_from: sos``, the default before issue 13): small organs only
     from SOS, S-Net's label map is its argmax over the non-small classes, so every voxel S-Net gave a
     small organ becomes S-Net's second choice (a large organ or background) -- large-organ false
     positives next to the small organs.

Peak memory (float32, ``C`` classes, ``K`` small organs, volume ``X x Y x Z``, patch ``px x py x pz``):
    the input image (4 XYZ bytes; plus one padded copy only if the volume is smaller than the patch)
    + the uint8 label map (XYZ bytes)
    + the slab buffer (C + K + 1) * X * Y * pz * 4 bytes (blended sums + weight sum)
    + the int64 argmax of one finalised slab, 8 * X * Y * stride_z bytes (the slab itself is
      normalised in place inside the buffer; with return_snet_labels, a second uint8 label map)
    + the activations of ``sw_batch_size`` windows (and of one SOS window).
For 512 x 512 x 150, C = 18, K = 4, pz = 32 (stride 16): buffer 0.77 GB + labels 0.04 GB + argmax
0.03 GB, versus 2.8 GB for one full-resolution float32 volume per class (MONAI's full-volume blend
holds that plus a count map, and the softmax in ``predict_probabilities`` makes a second copy).
The buffer scales with X * Y * pz, not with Z.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from organseg.errors import ConfigError
from organseg.inference.precision import check_precision, inference_autocast
from organseg.inference.sliding_window import blend_slabs, scan_interval, window_starts
from organseg.spatial.heatmaps import log_parabola_offset
from organseg.spatial.roi import paste_roi, roi_box

__all__ = [
    "predict_focusnet",
    "blend_slabs",
    "scan_interval",
    "window_starts",
]  # the last three: sliding_window's

_EPS = 1e-6  # decode_centres' log clamp
MERGES = ("upstream", "replace_in_roi", "runner_up")
# the merge rules' names before issue 13 (checkpoints store them as ``small_organs_from``)
SMALL_ORGANS_FROM = {"sos": "runner_up", "snet_and_sos": "replace_in_roi"}


def check_merge(value: str) -> str:
    """``value`` if it is a known merge rule (module doc, step 4), else a one-line ConfigError."""
    if value not in MERGES:
        raise ConfigError(f"merge must be one of {MERGES}, got {value!r}")
    return value


def merge_from_small_organs_from(value: str) -> str:
    """The ``merge`` rule of a pre-issue-13 ``small_organs_from`` value (stored in older checkpoints)."""
    if value not in SMALL_ORGANS_FROM:
        raise ConfigError(f"small_organs_from must be one of {list(SMALL_ORGANS_FROM)}, got {value!r}")
    return SMALL_ORGANS_FROM[value]


class _PeakTracker:
    """Running per-organ maximum of the blended heatmaps over finalised slabs, with the log values of
    its six neighbours (``decode_centres``' sub-voxel rule). A neighbour in the next, not yet final
    slice is filled in when that slice arrives."""

    def __init__(self, k: int, size: Sequence[int]):
        self.size = tuple(size)
        self.peak = [-math.inf] * k
        self.idx = [None] * k
        self.nb = [[[None, None] for _ in range(3)] for _ in range(k)]  # [organ][axis][-1, +1] log h
        self.pending = [False] * k
        self.prev_last: torch.Tensor | None = None  # heatmaps [K, X, Y] of the last finalised slice

    @staticmethod
    def _log(v) -> float:
        return math.log(max(float(v), _EPS))

    def update(self, z0: int, heat: torch.Tensor) -> None:
        """heat [K, X, Y, L]: final blended heatmaps of slices z0 .. z0 + L - 1."""
        heat = heat.detach().float().cpu() if heat.device.type != "cpu" else heat
        _, X, Y, L = heat.shape
        for k in range(heat.shape[0]):
            if self.pending[k]:
                x, y, _ = self.idx[k]
                self.nb[k][2][1] = self._log(heat[k, x, y, 0])
                self.pending[k] = False
            m, flat = heat[k].reshape(-1).max(dim=0)
            m, flat = float(m), int(flat)
            if not m > self.peak[k]:
                continue
            x, y, zl = flat // (Y * L), (flat // L) % Y, flat % L
            self.peak[k], self.idx[k] = m, (x, y, z0 + zl)
            nb = self.nb[k]
            nb[0] = [
                self._log(heat[k, x - 1, y, zl]) if x > 0 else None,
                self._log(heat[k, x + 1, y, zl]) if x < X - 1 else None,
            ]
            nb[1] = [
                self._log(heat[k, x, y - 1, zl]) if y > 0 else None,
                self._log(heat[k, x, y + 1, zl]) if y < Y - 1 else None,
            ]
            below = (
                self._log(heat[k, x, y, zl - 1])
                if zl > 0
                else self._log(self.prev_last[k, x, y])
                if self.prev_last is not None
                else None
            )
            above = self._log(heat[k, x, y, zl + 1]) if zl < L - 1 else None
            self.pending[k] = zl == L - 1 and z0 + L < self.size[2]
            nb[2] = [below, above]
        self.prev_last = heat[..., -1].clone()

    def centre(self, k: int, subvoxel: bool = True) -> torch.Tensor:
        """Organ k's peak voxel, refined per axis where the peak is not on the volume border."""
        c = torch.tensor(self.idx[k], dtype=torch.float32)
        if not subvoxel:
            return c
        l0 = torch.tensor(self._log(self.peak[k]))
        for axis in range(3):
            lo, hi = self.nb[k][axis]
            if 0 < self.idx[k][axis] < self.size[axis] - 1 and lo is not None and hi is not None:
                c[axis] += log_parabola_offset(torch.tensor(lo), l0, torch.tensor(hi))
        return c


def _ceil_to(v: int, d: int) -> int:
    return -(-v // d) * d


@torch.no_grad()
def predict_focusnet(
    model,
    image: torch.Tensor,
    patch_size: Sequence[int] = (96, 96, 32),
    overlap: float = 0.5,
    threshold: float = 0.3,
    device: torch.device | str = "cpu",
    progress: bool = False,
    sw_batch_size: int = 2,
    subvoxel: bool = True,
    return_snet_labels: bool = False,
    merge: str = "upstream",
    precision: str = "fp32",
    channels_last: bool = False,
) -> dict:
    """Locate-zoom-paste FocusNetV2 inference on one CT ``image`` [1, 1, X, Y, Z] (normalised like
    training); see the module doc for the steps and the memory bound.

    ``patch_size`` must be divisible by ``model.snet.divisor``; the volume may be any size (it is
    padded with its minimum to at least ``patch_size``, MONAI's rule, and cropped back). The model is
    moved to ``device`` and put in eval mode (its previous train/eval mode is restored afterwards);
    the image and outputs stay on the CPU, windows run on ``device``.

    Speed settings (measured in ``benchmarks/results/focusnet_inference_cpu_2026-11-29.md``):
    ``sw_batch_size`` windows per network call (2, as the other models' sliding window);
    ``overlap`` sets the number of windows (~``1 / (1 - overlap)^3`` times those that tile the volume);
    ``precision`` (``organseg.inference.precision``): ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``
    autocast of the network calls, the blending stays float32; ``channels_last`` runs the network in
    ``torch.channels_last_3d`` (the model's parameters are converted back to contiguous afterwards).

    Returns a dict:
        ``labels``  uint8 [X, Y, Z]: S-Net's argmax (over the non-small classes with
                    ``merge="runner_up"``), with each found small organ's SOS mask merged (``merge``);
        ``centres`` float32 [K, 3] voxel (x, y, z) centres from SOL-Net, NaN where not found;
        ``found``   bool [K]: heatmap peak > ``threshold``;
        ``peaks``   float32 [K]: the blended heatmap peaks;
        ``roi_starts`` int64 [K, 3]: where each SOS ROI was pasted (volume coordinates; -1 rows when
                    not found); ROI k spans ``roi_starts[k] + model.roi_sizes[k]``;
        ``snet_labels`` (only with ``return_snet_labels``) uint8 [X, Y, Z]: S-Net's argmax over all
                    classes, before any paste.
    """
    if image.dim() != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"predict_focusnet needs an image [1, 1, X, Y, Z], got {tuple(image.shape)}")
    check_merge(merge)
    patch = tuple(int(p) for p in patch_size)
    divisor = tuple(model.snet.divisor)
    if len(patch) != 3 or any(p % d for p, d in zip(patch, divisor)):
        raise ConfigError(f"patch_size {patch} must be divisible by S-Net's divisor {divisor}")
    check_precision(precision)
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    try:
        with inference_autocast(device, precision):
            return _predict(
                model,
                image.detach().float().cpu(),
                patch,
                overlap,
                threshold,
                device,
                progress,
                sw_batch_size,
                subvoxel,
                return_snet_labels,
                merge,
                torch.channels_last_3d if channels_last else torch.contiguous_format,
            )
    finally:
        model.train(was_training)
        if channels_last:
            model.to(memory_format=torch.contiguous_format)


def _predict(
    model,
    image,
    patch,
    overlap,
    threshold,
    device,
    progress,
    sw_batch_size,
    subvoxel,
    return_snet_labels,
    merge,
    memory_format,
) -> dict:
    size = tuple(int(s) for s in image.shape[2:])
    num_classes, k_small = int(model.num_classes), int(model.num_small)
    # MONAI's padding for volumes smaller than the patch: half before, the rest after, with the minimum
    before = [max(p - s, 0) // 2 for s, p in zip(size, patch)]
    after = [max(p - s, 0) - b for s, p, b in zip(size, patch, before)]
    if any(before) or any(after):
        pads = [v for a in (2, 1, 0) for v in (before[a], after[a])]
        image = F.pad(image, pads, mode="constant", value=float(image.min()))
    psize = tuple(int(s) for s in image.shape[2:])

    def predictor(win: torch.Tensor) -> torch.Tensor:
        logits, _, heat = model.snet_sol(win.contiguous(memory_format=memory_format))
        return torch.cat([logits.float(), heat.float()], dim=1)

    labels = torch.zeros(psize, dtype=torch.uint8)
    snet_labels = torch.zeros(psize, dtype=torch.uint8) if return_snet_labels else None
    small = [int(c) for c in model.small_classes]
    tracker = _PeakTracker(k_small, size)  # peaks over the real volume only, in its coordinates
    for z0, z1, slab in blend_slabs(predictor, image, patch, overlap, sw_batch_size, device, progress):
        if snet_labels is not None:
            snet_labels[..., z0:z1] = slab[:num_classes].argmax(dim=0).to(torch.uint8).cpu()
        if merge == "runner_up" and small:
            slab[small] = -math.inf  # these slices are final: the buffer is free to overwrite here
        labels[..., z0:z1] = slab[:num_classes].argmax(dim=0).to(torch.uint8).cpu()
        lo, hi = max(z0, before[2]), min(z1, before[2] + size[2])
        if k_small and hi > lo:
            tracker.update(
                lo - before[2],
                slab[
                    num_classes : num_classes + k_small,
                    before[0] : before[0] + size[0],
                    before[1] : before[1] + size[1],
                    lo - z0 : hi - z0,
                ],
            )
    crop = tuple(slice(b, b + s) for b, s in zip(before, size))
    if any(before) or any(after):
        labels = labels[crop].clone()
        snet_labels = snet_labels[crop].clone() if snet_labels is not None else None

    peaks = torch.tensor(tracker.peak, dtype=torch.float32)
    found = peaks > threshold
    centres = torch.full((k_small, 3), float("nan"))
    roi_starts = torch.full((k_small, 3), -1, dtype=torch.int64)
    for k in range(k_small):
        if not bool(found[k]):
            continue
        centres[k] = tracker.centre(k, subvoxel)
        c_pad = centres[k] + torch.tensor(before, dtype=torch.float32)  # padded-volume coordinates
        # one window around the centre, big enough for the ROI, shifted inside the (padded) volume
        roi = model.roi_sizes[k]
        wsize = [
            min(max(p, _ceil_to(r, d)), (s // d) * d)
            for p, r, d, s in zip(patch, roi, model.snet.divisor, psize)
        ]
        wstart, _ = roi_box(c_pad, wsize, fit_within=psize)
        win = image[(slice(None), slice(None), *(slice(a, a + w) for a, w in zip(wstart, wsize)))].to(device)
        _, features, heat = model.snet_sol(win.contiguous(memory_format=memory_format))
        local = (c_pad - torch.tensor(wstart, dtype=torch.float32)).to(device)[None]
        roi_logits, starts = model.sos_logits(features, heat, win, local, k)
        mask = (roi_logits[0, 0].float() > 0).cpu()  # sigmoid > 0.5
        start = [int(s) + w - b for s, w, b in zip(starts[0].tolist(), wstart, before)]
        roi_starts[k] = torch.tensor(start)
        paste_roi(labels, mask, start, model.small_classes[k], inplace=True, clear=merge != "upstream")
    out = {"labels": labels, "centres": centres, "found": found, "peaks": peaks, "roi_starts": roi_starts}
    if return_snet_labels:
        out["snet_labels"] = snet_labels
    return out
