"""Gaussian-blended sliding-window inference over a whole case: MONAI's windows and weights, streamed in z.

:func:`predict_labels` (every model's ``predict_case`` but FocusNetV2's, whose locate-zoom-paste pipeline
uses the same :func:`blend_slabs`) never holds a full-resolution float volume per class. Windows are
MONAI's (``dense_patch_slices`` grid, ``compute_importance_map(mode="gaussian", sigma_scale=0.125)``,
volumes smaller than the patch padded with their minimum, half before and the rest after), run one z-start
at a time; their weighted logits are summed into a buffer one patch deep, and the slices no later window
reaches are normalised, turned into softmax probabilities and argmax labels (uint8) one slice at a time.

Memory on top of the input image ``[B, 1, X, Y, Z]`` (float32, ``C`` classes, patch ``px x py x pz``):
the uint8 labels (``B X Y Z`` bytes), the buffer ``(C + 1) X Y pz`` float32, one slice's softmax
``C X Y`` float32, and the activations of ``sw_batch_size`` windows. :func:`predict_labels` caps the buffer
at ``buffer_mib``: above it, the volume is run in x bands, each with only the windows that reach it and a
buffer as wide as they are; a window column on a band border runs once per band (``x_bands``: at the default
96 MiB, 3 bands on the 410 x 359 crop of a 512 x 512 CT, 14 window columns instead of 12), and the labels
are the same, bit for bit
(every voxel sums the same window outputs in the same order). The buffer grows with ``X Y pz``, not
with ``Z``: MONAI's ``sliding_window_inference`` holds ``C X Y Z`` float32 logits plus a weight map and
:func:`predict_probabilities` a second ``C X Y Z`` copy for the softmax (18 classes on a 502 x 502 x 250
grid: 4.5 GB, versus 0.3 GB of buffer for a 16-slice patch).

Labels: the blend adds each voxel's (at most 8 with overlap 0.5) window contributions in another order
than MONAI (z-start first rather than x-start first), so probabilities agree with
``predict_probabilities`` to float32 rounding (~1e-7) and a label can differ only where the two best
classes tie to that precision (``tests/test_focusnet_inference.py`` checks identical labels against the
full-volume MONAI path). Under bf16/fp16 autocast the window outputs are blended in float32, where MONAI
multiplied them by the weights in the autocast type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference

#: the most :func:`predict_labels`'s blending buffer holds by default (MiB); larger volumes run in x bands
DEFAULT_BUFFER_MIB = 96.0

__all__ = [
    "blend_slabs",
    "pad_to_patch",
    "x_bands",
    "predict_labels",
    "predict_probabilities",
    "scan_interval",
    "window_starts",
]


def scan_interval(image_size: Sequence[int], patch_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """The window step per axis that ``sliding_window_inference`` uses: ``int(patch * (1 - overlap))``, at
    least 1, and one whole patch where the patch spans the axis. Written out because MONAI keeps this rule in
    a private helper, and importing a dependency's private name would break silently on its next release."""
    return tuple(int(p) if p == s else max(int(p * (1 - overlap)), 1) for s, p in zip(image_size, patch_size))


def window_starts(image_size: Sequence[int], patch_size: Sequence[int], overlap: float) -> list[list[int]]:
    """Per axis, the sorted window starts of MONAI's grid (``sliding_window_inference`` on a volume
    already at least ``patch_size``): ``dense_patch_slices`` with :func:`scan_interval`."""
    interval = scan_interval(image_size, patch_size, overlap)
    slices = dense_patch_slices(tuple(image_size), tuple(patch_size), interval)
    return [sorted({s[a].start for s in slices}) for a in range(3)]


@torch.no_grad()
def blend_slabs(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = False,
    x_range: tuple[int, int] | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Gaussian-blended sliding window streamed in z: yields ``(z0, z1, blended [C, X, Y, z1 - z0])``
    for consecutive z ranges covering the volume, each final (no later window touches it).

    ``image`` [1, 1, X, Y, Z] with every size >= ``patch_size`` (callers pad smaller volumes);
    ``predictor`` maps windows [B, 1, *patch] on ``device`` to [B, C, *patch]. Windows and weights are
    MONAI's (see module doc); only a ``[C + 1, X, Y, patch_z]`` buffer lives on ``device``. The yielded
    tensor is a view of that buffer, valid until the generator is resumed.

    ``x_range`` ``(lo, hi)``: only voxels ``lo <= x < hi`` (the yielded slabs are ``[C, hi - lo, Y, ...]``),
    from the windows that reach them, in a buffer as wide as those windows (:func:`x_bands`).
    """
    if image.dim() != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"blend_slabs needs an image [1, 1, X, Y, Z], got {tuple(image.shape)}")
    size = tuple(int(s) for s in image.shape[2:])
    patch = tuple(int(p) for p in patch_size)
    if any(s < p for s, p in zip(size, patch)):
        raise ValueError(f"volume {size} is smaller than the patch {patch}; pad it first")
    device = torch.device(device) if device is not None else image.device
    xs, ys, zs = window_starts(size, patch, overlap)
    px, py, pz = patch
    lo, hi = (0, size[0]) if x_range is None else (int(x_range[0]), int(x_range[1]))
    if not 0 <= lo < hi <= size[0]:
        raise ValueError(f"x_range {x_range} is not inside [0, {size[0]})")
    xs = [x for x in xs if x < hi and x + px > lo]  # the window columns that reach the band
    x0 = xs[0]  # the buffer spans [x0, xs[-1] + px)
    width = xs[-1] + px - x0
    weight = compute_importance_map(
        patch, mode="gaussian", sigma_scale=0.125, device=device, dtype=torch.float32
    )
    acc = wsum = None
    origin = zs[0]  # = 0
    total = len(xs) * len(ys) * len(zs)
    done = 0

    def finalise(upto: int) -> torch.Tensor:
        n = upto - origin
        band = slice(lo - x0, hi - x0)
        return acc[:, band, :, :n].div_(wsum[band, :, :n])  # in place: these slices are final

    xy = [(x, y) for x in xs for y in ys]
    for z0 in zs:
        if acc is not None and z0 > origin:
            shift = z0 - origin
            yield origin, z0, finalise(z0)
            # shift the pending slices [shift, pz) to the front, slice by slice (no overlapping copy)
            for j in range(pz - shift):
                acc[..., j].copy_(acc[..., j + shift])
                wsum[..., j].copy_(wsum[..., j + shift])
            acc[..., pz - shift :] = 0
            wsum[..., pz - shift :] = 0
            origin = z0
        for i in range(0, len(xy), sw_batch_size):
            batch = xy[i : i + sw_batch_size]
            win = torch.cat([image[:, :, x : x + px, y : y + py, z0 : z0 + pz] for x, y in batch]).to(device)
            out = predictor(win).float()
            if acc is None:
                acc = torch.zeros((out.shape[1], width, size[1], pz), dtype=torch.float32, device=device)
                wsum = torch.zeros((width, size[1], pz), dtype=torch.float32, device=device)
            for b, (x, y) in enumerate(batch):
                acc[:, x - x0 : x - x0 + px, y : y + py, :] += out[b] * weight
                wsum[x - x0 : x - x0 + px, y : y + py, :] += weight
            done += len(batch)
            if progress:
                print(f"\rwindows {done}/{total}", end="" if done < total else "\n", flush=True)
    yield origin, size[2], finalise(size[2])


def x_bands(
    image_size: Sequence[int], patch_size: Sequence[int], overlap: float, channels: int, buffer_mib: float
) -> list[tuple[int, int]]:
    """Voxel ranges ``[lo, hi)`` along x covering ``image_size[0]``, as few as keep each band's
    :func:`blend_slabs` buffer (``channels + 1`` float32 maps, as wide as the windows reaching the band)
    within ``buffer_mib`` (one band per window column when even that is wider); bands border on window starts,
    so a window column on a border runs in both bands. One band when the whole buffer fits."""
    size = [int(s) for s in image_size]
    px, pz = int(patch_size[0]), int(patch_size[2])
    xs = window_starts(size, patch_size, overlap)[0]
    per_x = (channels + 1) * size[1] * pz * 4 / 2**20  # MiB of buffer per voxel of x

    def bands(n: int) -> list[tuple[int, int]]:
        cuts = [int(xs[round(i * len(xs) / n)]) for i in range(1, n)]  # band borders at window starts
        edges = [0, *cuts, size[0]]
        return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]

    def widest(band_list) -> int:
        return max(
            max(x + px for x in xs if x < b and x + px > a) - min(x for x in xs if x < b and x + px > a)
            for a, b in band_list
        )

    for n in range(1, len(xs) + 1):
        chosen = bands(n)
        if widest(chosen) * per_x <= buffer_mib:
            return chosen
    return chosen


def pad_to_patch(
    image: torch.Tensor, patch_size: Sequence[int], value: float
) -> tuple[torch.Tensor, list[int]]:
    """MONAI's padding for a volume smaller than the patch: ``image`` [B, C, X, Y, Z] padded with ``value``
    to at least ``patch_size`` per axis, half before (rounded down) and the rest after; ``(padded, before)``
    (the padding before each axis). Returns ``image`` itself when no axis is smaller."""
    size = [int(s) for s in image.shape[2:]]
    before = [max(int(p) - s, 0) // 2 for s, p in zip(size, patch_size)]
    after = [max(int(p) - s, 0) - b for s, p, b in zip(size, patch_size, before)]
    if not any(before) and not any(after):
        return image, before
    pads = [v for a in (2, 1, 0) for v in (before[a], after[a])]
    return F.pad(image, pads, mode="constant", value=value), before


@torch.no_grad()
def predict_probabilities(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Softmax probabilities [B,C,*S] for ``image`` [B,1,*S]; windows blended with a Gaussian
    (nnU-Net style) so window borders do not show. Windows run on ``device``; the stitched output
    stays on the image's device (CPU for big volumes). Holds ``2 C`` float32 copies of the volume: for
    labels use :func:`predict_labels`, which streams."""
    logits = sliding_window_inference(
        image,
        roi_size=list(roi_size),
        sw_batch_size=sw_batch_size,
        predictor=predictor,
        overlap=overlap,
        mode="gaussian",
        padding_mode="constant",
        cval=float(image.min()),
        sw_device=device,
        device=image.device,
        progress=progress,
    )
    return torch.softmax(logits, dim=1)


@torch.no_grad()
def predict_labels(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    device: torch.device | str | None = None,
    progress: bool = False,
    buffer_mib: float = DEFAULT_BUFFER_MIB,
    window_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Label map [B,*S] (uint8, on the image's device) = argmax of the Gaussian-blended softmax
    probabilities of ``image`` [B,1,*S], streamed in z (module doc: memory, and agreement with
    ``predict_probabilities(...).argmax(1)``). Windows run on ``device`` (default: the image's).
    ``buffer_mib``: the most the blending buffer may hold; larger volumes run in x bands (:func:`x_bands`).
    ``window_transform``: applied to each window (on ``device``) before ``predictor``, e.g. the intensity
    normalisation of an int16 image; padding uses the image's minimum before it, so a monotone transform
    gives the padding MONAI would give the transformed image."""
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"predict_labels needs an image [B, 1, X, Y, Z], got {tuple(image.shape)}")
    patch = [int(p) for p in roi_size]
    size = [int(s) for s in image.shape[2:]]
    cval = float(image.min())  # MONAI pads with the minimum of the whole batch
    sw_device = image.device if device is None else torch.device(device)
    labels = torch.empty((image.shape[0], *size), dtype=torch.uint8, device=image.device)
    if window_transform is not None:
        net = predictor

        def predictor(windows: torch.Tensor) -> torch.Tensor:
            return net(window_transform(windows))

    channels = None
    for b in range(image.shape[0]):
        padded, before = pad_to_patch(image[b : b + 1], patch, cval)
        padded_size = [int(s) for s in padded.shape[2:]]
        if channels is None:  # the class count, from one window (bands are sized by it)
            probe = padded[:, :, : patch[0], : patch[1], : patch[2]].to(sw_device)
            channels = int(predictor(probe).shape[1])
        for xa, xb in x_bands(padded_size, patch, overlap, channels, buffer_mib):
            # the band's voxels inside the unpadded volume (padded coordinates; never empty: a volume
            # padded in x is narrower than one patch, so it is one band)
            pa, pb = max(xa, before[0]), min(xb, before[0] + size[0])
            stream = blend_slabs(
                predictor, padded, patch, overlap, sw_batch_size, sw_device, progress, x_range=(xa, xb)
            )
            for z0, z1, slab in stream:  # slab [C, xb - xa, Y', z1 - z0]: final blended logits (padded grid)
                lo, hi = max(z0, before[2]), min(z1, before[2] + size[2])
                for z in range(lo, hi):  # one slice at a time: the softmax copy stays C x band x Y'
                    probs = torch.softmax(slab[:, pa - xa : pb - xa, :, z - z0], dim=0)
                    probs = probs[:, :, before[1] : before[1] + size[1]]
                    labels[b, pa - before[0] : pb - before[0], :, z - before[2]] = (
                        probs.argmax(0).to(torch.uint8).to(image.device)
                    )
            slab = probs = stream = None  # the band's buffer goes before the next band's is made
    return labels
