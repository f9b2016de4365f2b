"""Training steps/s of the networks before and after their kernels followed the voxel spacing (issue 11).

Four networks on the H&N phantom card's label space (data_modules/cards/hn_phantom.yaml: 18 classes,
1 x 1 x 3 mm), each trained here for a fixed number of optimiser steps (forward, weighted focal + Dice
loss, backward, AdamW step) on random data: batch ``--batch`` 2, patch ``--patch`` 96x96x32, torch on
``--threads`` 2 threads, OpenMP's waiting threads passive as under the ``organseg`` command:

    unet_old        experiments/baseline/unet.yaml's U-Net as before issue 11: 3x3x3 at every level
    unet_spacing    the same U-Net with the card's spacing: nnU-Net's kernels ((3,3,1) at full resolution,
                    encoder and decoder; networks/unet.py)
    snet_upstream   S-Net, experiments/focusnetv2/architecture.yaml (snet_full_res_kernels: upstream,
                    3x3x3 skip1/dec2 as the authors' code)
    snet_inplane    the same with snet_full_res_kernels: inplane ((3,3,1) skip1/dec2, ours)

Measured side by side: ``--warmup`` untimed steps per network, then ``--repeats`` rounds, each timing a
window of ``--steps`` steps of every network, the order rotated every round, so load from other jobs on
a shared machine falls on all of them alike. Per window: wall steps/s, the process's CPU seconds per step
(less sensitive to other jobs than wall time: time this process waits for a core is not counted), and
the 1-minute load average at its start. Ratios new / old are taken within each round, then the median.
Forward multiply-adds of the convolutions are counted once (hooks), the load-independent expectation.

Writes OUT/step_speed_cpu_<date>.md and .json (OUT: benchmarks/results).

    .venv/bin/python benchmarks/step_speed.py [--steps 4] [--repeats 3] [--warmup 1]
    .venv/bin/python benchmarks/step_speed.py --patch 32 32 8 --steps 1 --repeats 1 --out /tmp   # smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from organseg.runtime.openmp import prefer_passive_waits, wait_policy

prefer_passive_waits()  # before torch loads, as cli/main.py does

import torch  # noqa: E402  (after the OpenMP policy is set)
from torch import nn  # noqa: E402

from organseg.io.card import DatasetCard  # noqa: E402
from organseg.losses import FocalDiceLoss  # noqa: E402
from organseg.methods import UNetBaseline  # noqa: E402
from organseg.networks.focusnetv2 import FocusNetArchitecture  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CARD = ROOT / "data_modules/cards/hn_phantom.yaml"
ARCHITECTURE = ROOT / "experiments/focusnetv2/architecture.yaml"
UNET_STRIDES = [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]  # experiments/baseline/unet.yaml
NAMES = ("unet_old", "unet_spacing", "snet_upstream", "snet_inplane")
PAIRS = (("unet_spacing", "unet_old"), ("snet_inplane", "snet_upstream"))


def build(name: str, card: DatasetCard, patch: list[int]) -> nn.Module:
    """The network ``name`` (module doc) for ``card``'s classes and spacing."""
    classes = list(card.classes)
    if name.startswith("unet"):
        spacing = list(card.target_spacing) if name == "unet_spacing" else None
        return UNetBaseline(len(classes), classes, patch, strides=UNET_STRIDES, spacing=spacing).net
    import yaml

    given = yaml.safe_load(ARCHITECTURE.read_text())
    given["snet_full_res_kernels"] = "inplane" if name == "snet_inplane" else "upstream"
    arch = FocusNetArchitecture.of(given)
    return arch.build(classes, list(card.small), list(card.target_spacing)).snet


def conv_macs(net: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of every (transposed) convolution in one forward of ``x``."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        k = 1
        for v in m.kernel_size:
            k *= v
        if isinstance(m, nn.ConvTranspose3d):
            total += inputs[0].numel() * (m.out_channels // m.groups) * k
        else:
            total += out.numel() * (m.in_channels // m.groups) * k

    hooks = [
        m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))
    ]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return total


class Trainer:
    """One network with its loss, optimiser and a fixed random batch."""

    def __init__(self, net: nn.Module, num_classes: int, batch: int, patch: list[int], seed: int):
        g = torch.Generator().manual_seed(seed)
        self.net = net.train()
        self.loss = FocalDiceLoss(num_classes)
        self.opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        self.x = torch.randn(batch, 1, *patch, generator=g)
        self.y = torch.randint(0, num_classes, (batch, *patch), generator=g)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        out = self.net(self.x)
        self.loss(out, self.y)["loss"].backward()
        self.opt.step()


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def time_window(trainer: Trainer, steps: int) -> dict:
    load = os.getloadavg()[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        trainer.step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "steps": steps,
        "wall_s": wall,
        "steps_per_s": steps / wall,
        "cpu_s_per_step": cpu / steps,
        "load1_start": load,
        "load1_end": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per network per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds (>= 3 for a median of ratios)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per network first")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--patch", type=int, nargs=3, default=[96, 96, 32], metavar=("X", "Y", "Z"))
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    card = DatasetCard.load(CARD)
    patch = list(args.patch)
    nets = {n: build(n, card, patch) for n in NAMES}
    probe = torch.zeros(1, 1, *patch)
    info = {
        n: {
            "params": sum(q.numel() for q in net.parameters()),
            "gmac_fwd_per_sample": conv_macs(net, probe) / 1e9,
        }
        for n, net in nets.items()
    }
    trainers = {
        n: Trainer(net, card.num_classes, args.batch, patch, seed=i)
        for i, (n, net) in enumerate(nets.items())
    }
    start_uptime = uptime()
    print(f"# step speed: batch {args.batch} x {patch}, {torch.get_num_threads()} threads, {wait_policy()}")
    print(f"# {start_uptime}")
    for n in NAMES:
        print(
            f"{n:14s} params {info[n]['params']:>10,d}  "
            f"conv GMAC/sample fwd {info[n]['gmac_fwd_per_sample']:.2f}"
        )
    for n in NAMES:
        for _ in range(args.warmup):
            trainers[n].step()

    rounds: list[dict] = []
    for r in range(args.repeats):
        order = NAMES[r % len(NAMES) :] + NAMES[: r % len(NAMES)]
        row = {"round": r, "order": list(order), "uptime": uptime(), "windows": {}}
        for n in order:
            w = time_window(trainers[n], args.steps)
            row["windows"][n] = w
            print(
                f"round {r} {n:14s} {w['steps_per_s']:.3f} steps/s  {w['cpu_s_per_step']:.2f} CPU s/step  "
                f"load {w['load1_start']:.2f}",
                flush=True,
            )
        rounds.append(row)
    end_uptime = uptime()

    summary = {}
    for n in NAMES:
        ws = [row["windows"][n] for row in rounds]
        summary[n] = {
            **info[n],
            "steps_per_s_median": statistics.median(w["steps_per_s"] for w in ws),
            "steps_per_s": [w["steps_per_s"] for w in ws],
            "cpu_s_per_step_median": statistics.median(w["cpu_s_per_step"] for w in ws),
            "load1": [w["load1_start"] for w in ws],
        }
    ratios = {}
    for new, old in PAIRS:
        per_round = [
            row["windows"][new]["steps_per_s"] / row["windows"][old]["steps_per_s"] for row in rounds
        ]
        cpu_ratio = [
            row["windows"][old]["cpu_s_per_step"] / row["windows"][new]["cpu_s_per_step"] for row in rounds
        ]
        ratios[f"{new}/{old}"] = {
            "steps_per_s_ratio_per_round": per_round,
            "steps_per_s_ratio_median": statistics.median(per_round),
            "cpu_per_step_ratio_median": statistics.median(cpu_ratio),
            "mac_ratio": info[old]["gmac_fwd_per_sample"] / info[new]["gmac_fwd_per_sample"],
        }

    today = dt.date.today().isoformat()
    command = "benchmarks/step_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "command": command.strip(),
        "date": today,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "omp": wait_policy(),
        "batch": args.batch,
        "patch": patch,
        "steps_per_window": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "uptime_start": start_uptime,
        "uptime_end": end_uptime,
        "networks": summary,
        "ratios": ratios,
        "rounds": rounds,
    }
    md = render(result)
    print()
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"step_speed_cpu_{today}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md)
    print(f"wrote {stem}.md and .json")
    return 0


def render(res: dict) -> str:
    lines = [
        f"# Training steps/s: kernels from the voxel spacing (issue 11), {res['date']}",
        "",
        f"`.venv/bin/python {res['command']}`: batch {res['batch']} x {res['patch']} (x, y, z), random data, "
        f"forward + focal/Dice loss + backward + AdamW step, {res['threads']} torch threads ({res['omp']}), "
        f"{res['warmup']} warm-up step(s), then {res['repeats']} interleaved rounds of "
        f"{res['steps_per_window']} steps per network (order rotated each round). "
        "Card: data_modules/cards/hn_phantom.yaml (18 classes, 1 x 1 x 3 mm).",
        "",
        f"Load: start `{res['uptime_start']}`; end `{res['uptime_end']}`. The machine was shared with other "
        "jobs: compare the ratios (measured within each round), not the absolute steps/s.",
        "",
        "| network | kernels | params | conv GMAC/sample (fwd) | steps/s (median) | steps/s per round | "
        "CPU s/step (median) | load (1 min) per round |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    kernels = {
        "unet_old": "3x3x3 everywhere (before)",
        "unet_spacing": "nnU-Net rule: (3,3,1) at full res",
        "snet_upstream": "upstream: 3x3x3 skip1/dec2",
        "snet_inplane": "inplane: (3,3,1) skip1/dec2",
    }
    for n, s in res["networks"].items():
        lines.append(
            f"| {n} | {kernels[n]} | {s['params']:,} | {s['gmac_fwd_per_sample']:.2f} | "
            f"{s['steps_per_s_median']:.3f} | {', '.join(f'{v:.3f}' for v in s['steps_per_s'])} | "
            f"{s['cpu_s_per_step_median']:.2f} | {', '.join(f'{v:.2f}' for v in s['load1'])} |"
        )
    lines += [
        "",
        "| new / old | steps/s ratio (median of rounds) | per round | CPU-per-step ratio old/new (median) | "
        "conv MAC ratio old/new |",
        "|---|---:|---|---:|---:|",
    ]
    for k, r in res["ratios"].items():
        lines.append(
            f"| {k} | {r['steps_per_s_ratio_median']:.2f} | "
            f"{', '.join(f'{v:.2f}' for v in r['steps_per_s_ratio_per_round'])} | "
            f"{r['cpu_per_step_ratio_median']:.2f} | {r['mac_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
