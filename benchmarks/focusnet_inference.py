"""FocusNetV2 whole-volume inference (locate-zoom-paste): wall time and peak memory.

Builds a FocusNetV2 with the default widths and RANDOM weights (timing and memory do not depend on the
weights; the threshold is set to 0 so every small organ counts as found and its SOS-Net runs, as with a
trained model), and runs ``predict_focusnet`` on a random volume with normalised-CT-like intensities.
Prints wall time, peak RSS (``ru_maxrss``) before and after, the z-slab buffer the pipeline allocates,
and for comparison one full-resolution float32 tensor per class (what a full-volume blend holds).

    .venv/bin/python benchmarks/focusnet_inference.py                       # 512 x 512 x 150, CPU
    .venv/bin/python benchmarks/focusnet_inference.py --shape 256 256 64 --threads 1
    .venv/bin/python benchmarks/focusnet_inference.py --base-channels 4 --threads 1   # full size, memory only

Time scales with the number of windows (printed); the slab buffer with X * Y * patch_z, not with Z.
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch

from organseg.inference.locate_zoom_paste import predict_focusnet, window_starts
from organseg.networks.focusnetv2 import FocusNetV2


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=(512, 512, 150), metavar=("X", "Y", "Z"))
    p.add_argument("--patch", type=int, nargs=3, default=(96, 96, 32), metavar=("PX", "PY", "PZ"))
    p.add_argument("--classes", type=int, default=18, help="classes incl. background")
    p.add_argument("--small", type=int, default=4, help="small organs (SOL/SOS), classes 1..K")
    p.add_argument("--roi", type=int, nargs=3, default=(64, 64, 8), help="SOS ROI (voxels)")
    p.add_argument("--base-channels", type=int, default=16, help="S-Net width (model default 16)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    c, k, shape, patch = args.classes, args.small, tuple(args.shape), tuple(args.patch)
    model = FocusNetV2(
        c, list(range(1, k + 1)), [tuple(args.roi)] * k, base_channels=args.base_channels
    ).eval()
    image = torch.randn(1, 1, *shape)  # zero mean, unit variance like z-scored CT
    # warm-up on one patch (allocator, kernels) so 'before' includes the model's steady state
    predict_focusnet(model, torch.randn(1, 1, *patch), patch_size=patch, threshold=0.0, device=args.device)
    padded = [max(a, b) for a, b in zip(shape, patch)]
    n_win = math.prod(len(s) for s in window_starts(padded, patch, args.overlap))
    voxels = math.prod(shape)
    full = c * voxels * 4
    slab = (c + k + 1) * shape[0] * shape[1] * patch[2] * 4
    print(
        f"volume {shape} ({voxels / 1e6:.1f} M voxels), patch {patch}, overlap {args.overlap}: "
        f"{n_win} windows; {c} classes, {k} small organs; S-Net params "
        f"{sum(p.numel() for p in model.snet.parameters()) / 1e6:.2f} M (random weights); "
        f"threads {torch.get_num_threads()}, device {args.device}"
    )
    print(
        f"one full-resolution float32 tensor per class: {full / 2**20:.0f} MiB; "
        f"slab buffer (C+K+1) x X x Y x pz x 4 B: {slab / 2**20:.0f} MiB; "
        f"input image {voxels * 4 / 2**20:.0f} MiB"
    )
    before = rss_mib()
    t0 = time.perf_counter()
    out = predict_focusnet(
        model, image, patch_size=patch, overlap=args.overlap, threshold=0.0, device=args.device, progress=True
    )
    wall = time.perf_counter() - t0
    after = rss_mib()
    print(f"wall {wall:.1f} s ({wall / n_win:.2f} s/window incl. SOS); found {int(out['found'].sum())}/{k}")
    print(
        f"peak RSS before {before:.0f} MiB, after {after:.0f} MiB, growth {after - before:.0f} MiB "
        f"({(after - before) * 2**20 / full:.2f} x one float32 volume per class)"
    )


if __name__ == "__main__":
    main()
