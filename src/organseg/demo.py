"""``make demo``: phantom -> preprocess -> fit the baseline -> evaluate -> per-organ table.

Runs the same ``organseg`` commands a user would type (printed before each step), so the demo
doubles as a walkthrough. Budget: under 15 minutes on a 2-core CPU.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

CARD = "data_modules/cards/hn_phantom_demo.yaml"


def sh(args: list[str]) -> None:
    print(f"\n$ {' '.join(shlex.quote(a) for a in args)}", flush=True)
    subprocess.run(args, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})   # progress lines as they come


def main() -> int:
    os.environ.setdefault("WANDB_MODE", "offline")
    exe = str(Path(sys.executable).with_name("organseg"))
    run_id = time.strftime("demo-%Y%m%d-%H%M%S")
    t0 = time.time()
    sh([exe, "phantom", "hn", "--out", "data/raw/hn_phantom", "--cases", "20", "--seed", "0"])
    sh([exe, "preprocess", CARD])
    sh([exe, "fit", "-c", "experiments/baseline/unet.yaml", "-c", "data_modules/hn_phantom_demo.yaml",
        "-c", "experiments/demo.yaml", f"--trainer.logger.init_args.id={run_id}"])
    run = Path("lightning_logs/organseg") / run_id
    ckpts = sorted((run / "checkpoints").glob("epoch*.ckpt"))
    ckpt = ckpts[-1] if ckpts else run / "checkpoints" / "last.ckpt"
    sh([exe, "evaluate", "--ckpt", str(ckpt), "--split", "test", "--out", str(run / "eval_test")])
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min")
    print(f"  run folder:  {run}  (config_fit.yaml, checkpoints/)")
    print(f"  evaluation:  {run / 'eval_test'}  (report.md, per_case.csv, summary.json, overlays/*.png)")
    print("  W&B (offline): lightning_logs/wandb/  -> `wandb sync` it to upload")
    return 0


if __name__ == "__main__":
    sys.exit(main())
