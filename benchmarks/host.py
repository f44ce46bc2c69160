"""The machine a benchmark ran on, as its results file records it.

The CPU decides as much as the code: a bpe-mini bf16 step is 2-3x faster than fp32 on a CPU with AMX
and 15x slower on one without bf16 units, and the machine under these scripts has changed between
sessions (docs/benchmarks.md). So every results file names the CPU model, its family and model
numbers, the vector units that matter here, the cores, and the torch and Python versions.
"""

from __future__ import annotations

import os
import platform

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # the units these benchmarks' kernels use


def describe() -> dict:
    """CPU model, family/model numbers, vector units, cores, bf16 units, torch and Python versions."""
    import torch

    from gptlab.machine import cpu_fields, cpu_has_bf16

    fields = cpu_fields()
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "family_model": f"{fields['cpu family']}/{fields['model']}" if "cpu family" in fields else None,
        "units": [flag for flag in FLAGS if flag in flags],
        "bf16_units": cpu_has_bf16(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
