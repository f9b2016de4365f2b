"""FocusNetV2 whole-volume inference (locate-zoom-paste): wall time, CPU time and peak memory.

Builds a FocusNetV2 with the default widths and RANDOM weights (timing and memory do not depend on the
weights; the threshold is set to 0 so every small organ counts as found and its SOS-Net runs, as with a
trained model), and runs ``predict_focusnet`` on a random volume with normalised-CT-like intensities.
``--malloc retain`` (default) keeps freed memory in the process as ``organseg predict`` does
(``organseg.runtime.allocator``); ``--malloc glibc`` is the behaviour before. Prints wall time,
process CPU seconds (user + sys: on a machine shared with other jobs, CPU-s / cores
estimates the wall time on idle cores), the load average, peak RSS (``ru_maxrss``) before and after,
the z-slab buffer the pipeline allocates, and for comparison one full-resolution float32 tensor per
class (what a full-volume blend holds). The last line is the same as JSON.

    .venv/bin/python benchmarks/focusnet_inference.py                       # 512 x 512 x 150, CPU
    .venv/bin/python benchmarks/focusnet_inference.py --overlap 0.25 --sw-batch-size 2
    .venv/bin/python benchmarks/focusnet_inference.py --shape 256 256 64 --threads 1
    .venv/bin/python benchmarks/focusnet_inference.py --base-channels 4 --threads 1   # full size, memory only

``--compare SPEC [SPEC ...]`` runs several settings on the same weights and volume, one after the
other in one process (``--rounds`` times, interleaved), and counts the voxels whose label differs from
the first SPEC's (the reference): the check that a faster setting keeps the labels. A SPEC is
``key=value`` pairs joined by commas, keys ``patch`` (``96x96x32``), ``overlap``, ``batch``,
``precision`` (fp32 | bf16 | fp16), ``channels_last`` (0 | 1); missing keys take the command line's:

    .venv/bin/python benchmarks/focusnet_inference.py --shape 256 256 64 \\
        --compare overlap=0.5,batch=1 overlap=0.25,batch=2 overlap=0,batch=2 patch=128x128x32,overlap=0

Random weights give nearly tied logits, so the label differences they show are an upper bound for a
trained model; ``--ckpt`` uses a FocusNetV2 stage checkpoint's weights (``organseg fit`` SOS or joint
stage) instead, with its own threshold. Time scales with the number of windows (printed); the slab
buffer with X * Y * patch_z, not with Z.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time

import torch

from organseg.inference.locate_zoom_paste import predict_focusnet, window_starts
from organseg.inference.precision import PRECISIONS
from organseg.networks.focusnetv2 import FocusNetV2
from organseg.runtime.allocator import retain_freed_memory


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_seconds() -> float:
    """user + sys CPU seconds of this process (all its threads) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_average() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def n_windows(shape, patch, overlap) -> int:
    padded = [max(a, b) for a, b in zip(shape, patch)]
    return math.prod(len(s) for s in window_starts(padded, patch, overlap))


def parse_spec(spec: str, args) -> dict:
    """A ``--compare`` SPEC -> settings dict; keys not given take the command line's values."""
    out = {
        "patch": tuple(args.patch),
        "overlap": args.overlap,
        "batch": args.sw_batch_size,
        "precision": args.precision,
        "channels_last": args.channels_last,
    }
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key == "patch":
            out["patch"] = tuple(int(v) for v in value.split("x"))
        elif key == "overlap":
            out["overlap"] = float(value)
        elif key == "batch":
            out["batch"] = int(value)
        elif key == "precision":
            if value not in PRECISIONS:
                raise SystemExit(f"--compare {spec}: precision must be one of {PRECISIONS}")
            out["precision"] = value
        elif key == "channels_last":
            out["channels_last"] = value not in ("0", "false", "False")
        else:
            raise SystemExit(f"--compare {spec}: unknown key {key!r}")
    return out


def describe(s: dict) -> str:
    p = "x".join(str(v) for v in s["patch"])
    cl = ", channels_last" if s["channels_last"] else ""
    return f"patch {p}, overlap {s['overlap']}, batch {s['batch']}, {s['precision']}{cl}"


def run_once(model, image, s: dict, threshold: float, device: str, progress: bool) -> tuple[dict, dict]:
    load = load_average()
    c0, t0 = cpu_seconds(), time.perf_counter()
    out = predict_focusnet(
        model,
        image,
        patch_size=s["patch"],
        overlap=s["overlap"],
        threshold=threshold,
        device=device,
        progress=progress,
        sw_batch_size=s["batch"],
        precision=s["precision"],
        channels_last=s["channels_last"],
        return_snet_labels=True,
    )
    timing = {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0, "load_before": load}
    timing["load_after"] = load_average()
    return out, timing


def build_model(args):
    if args.ckpt:
        from organseg.methods.checkpoints import load_module  # noqa: PLC0415 (only with --ckpt)

        module, _ = load_module(args.ckpt, "cpu")
        if not hasattr(module, "focusnet"):
            raise SystemExit(f"--ckpt {args.ckpt}: not a FocusNetV2 stage checkpoint")
        return module.focusnet.eval(), float(module.hparams.get("loc_threshold", 0.3)), module.patch_size
    c, k = args.classes, args.small
    model = FocusNetV2(c, list(range(1, k + 1)), [tuple(args.roi)] * k, base_channels=args.base_channels)
    return model.eval(), 0.0, None


def compare(args, model, image, threshold) -> None:
    specs = [parse_spec(s, args) for s in args.compare]
    shape = tuple(image.shape[2:])
    rows = [{"settings": describe(s), "windows": n_windows(shape, s["patch"], s["overlap"])} for s in specs]
    ref = None
    for r in range(args.rounds):
        for i, s in enumerate(specs):
            out, timing = run_once(model, image, s, threshold, args.device, progress=False)
            row = rows[i]
            row.setdefault("runs", []).append(timing)
            if r == 0:
                if ref is None:
                    ref = out
                diff = (out["labels"] != ref["labels"]).float().mean().item()
                sdiff = (out["snet_labels"] != ref["snet_labels"]).float().mean().item()
                both = ref["found"] & out["found"]
                dist = (out["centres"][both] - ref["centres"][both]).norm(dim=1)
                row.update(
                    labels_differ_pct=100 * diff,
                    snet_labels_differ_pct=100 * sdiff,
                    found=int(out["found"].sum()),
                    centre_shift_max_vox=float(dist.max()) if len(dist) else 0.0,
                )
            print(
                f"round {r} [{i}] {row['settings']}: {row['windows']} windows, "
                f"wall {timing['wall_s']:.1f} s, "
                f"CPU {timing['cpu_s']:.1f} s ({timing['cpu_s'] / row['windows']:.2f} CPU-s/window), "
                f"load {timing['load_before']} -> {timing['load_after']}; labels differ from [0]: "
                f"{row['labels_differ_pct']:.3f} % (S-Net alone {row['snet_labels_differ_pct']:.3f} %), "
                f"centres moved <= {row['centre_shift_max_vox']:.2f} voxels",
                flush=True,
            )
    print(
        json.dumps(
            {"shape": shape, "threads": torch.get_num_threads(), "malloc": args.malloc, "compare": rows}
        )
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=(512, 512, 150), metavar=("X", "Y", "Z"))
    p.add_argument("--patch", type=int, nargs=3, default=(96, 96, 32), metavar=("PX", "PY", "PZ"))
    p.add_argument("--classes", type=int, default=18, help="classes incl. background")
    p.add_argument("--small", type=int, default=4, help="small organs (SOL/SOS), classes 1..K")
    p.add_argument("--roi", type=int, nargs=3, default=(64, 64, 8), help="SOS ROI (voxels)")
    p.add_argument("--base-channels", type=int, default=16, help="S-Net width (model default 16)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    p.add_argument("--sw-batch-size", type=int, default=2, help="windows per network call (default 2)")
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="autocast precision (default fp32)"
    )
    p.add_argument("--channels-last", action="store_true", help="run the network in channels_last_3d")
    p.add_argument(
        "--malloc",
        choices=("retain", "glibc"),
        default="retain",
        help="retain: keep freed memory in the process, as `organseg predict` does "
        "(organseg.runtime.allocator); glibc: its defaults (the behaviour before)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", default=None, help="a FocusNetV2 stage checkpoint instead of random weights")
    p.add_argument("--compare", nargs="+", metavar="SPEC", help="settings to run side by side (see above)")
    p.add_argument("--rounds", type=int, default=1, help="--compare: interleaved rounds (default 1)")
    args = p.parse_args(argv)
    malloc = args.malloc
    if malloc == "retain" and not retain_freed_memory():
        malloc = "glibc (retain not supported here)"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model, threshold, ckpt_patch = build_model(args)
    if ckpt_patch is not None and args.patch == p.get_default("patch"):
        args.patch = tuple(ckpt_patch)
    c, k = int(model.num_classes), int(model.num_small)
    shape = tuple(args.shape)
    image = torch.randn(1, 1, *shape)  # zero mean, unit variance like z-scored CT
    if args.compare:
        compare(args, model, image, threshold)
        return
    s = parse_spec("", args)
    patch = s["patch"]
    # warm-up on one patch (allocator, kernels) so 'before' includes the model's steady state
    predict_focusnet(model, torch.randn(1, 1, *patch), patch_size=patch, threshold=0.0, device=args.device)
    win = n_windows(shape, patch, args.overlap)
    voxels = math.prod(shape)
    full = c * voxels * 4
    slab = (c + k + 1) * shape[0] * shape[1] * patch[2] * 4
    print(
        f"volume {shape} ({voxels / 1e6:.1f} M voxels), {describe(s)}: "
        f"{win} windows; {c} classes, {k} small organs; S-Net params "
        f"{sum(p.numel() for p in model.snet.parameters()) / 1e6:.2f} M "
        f"({'checkpoint' if args.ckpt else 'random'} weights); "
        f"threads {torch.get_num_threads()}, device {args.device}, malloc {malloc}"
    )
    print(
        f"one full-resolution float32 tensor per class: {full / 2**20:.0f} MiB; "
        f"slab buffer (C+K+1) x X x Y x pz x 4 B: {slab / 2**20:.0f} MiB; "
        f"input image {voxels * 4 / 2**20:.0f} MiB"
    )
    before = rss_mib()
    out, timing = run_once(model, image, s, threshold, args.device, progress=True)
    after = rss_mib()
    wall, cpu, threads = timing["wall_s"], timing["cpu_s"], torch.get_num_threads()
    print(
        f"wall {wall:.1f} s ({wall / win:.2f} s/window incl. SOS), CPU {cpu:.1f} s "
        f"({cpu / win:.2f} CPU-s/window; / {threads} threads = {cpu / threads:.0f} s), "
        f"load {timing['load_before']} -> {timing['load_after']}; found {int(out['found'].sum())}/{k}"
    )
    print(
        f"peak RSS before {before:.0f} MiB, after {after:.0f} MiB, growth {after - before:.0f} MiB "
        f"({(after - before) * 2**20 / full:.2f} x one float32 volume per class)"
    )
    summary = {"shape": shape, "settings": describe(s), "windows": win, "threads": torch.get_num_threads()}
    summary["malloc"] = malloc
    summary.update(timing, peak_rss_mib=after, rss_growth_mib=after - before)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
