"""The numeric precision of whole-volume inference: ``fp32`` (default), ``bf16`` or ``fp16`` autocast.

``inference_autocast(device, precision)`` is the context every whole-case prediction runs its network
calls in (``predict_focusnet``'s windows, ``organseg predict --precision``). Autocast runs convolutions
and matrix products in the lower precision and keeps normalisation, softmax and the blending sums in
float32; the blended outputs are float32 either way.

Where it pays (benchmarks/results/focusnet_inference_cpu_2026-11-29.md): on a GPU ``fp16``/``bf16``
(tensor cores); on a CPU only with native bf16 instructions (AVX512-BF16 or AMX). On an AVX2-only CPU
bf16 is emulated and slower than fp32, hence the ``fp32`` default. Labels may differ from fp32 where
two classes' logits are nearly tied; the benchmark's ``--compare`` mode counts those voxels.
"""

from __future__ import annotations

import contextlib

import torch

from organseg.errors import ConfigError

__all__ = ["PRECISIONS", "check_precision", "inference_autocast"]

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(value: str) -> str:
    """``value`` if it is one of ``PRECISIONS``, else a one-line ConfigError."""
    if value not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {value!r}")
    return value


def inference_autocast(
    device: torch.device | str, precision: str = "fp32"
) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` on ``device``'s type (a no-op context for ``fp32``)."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])
