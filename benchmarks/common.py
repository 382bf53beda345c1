"""What every benchmark table names: the machine it was measured on."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe_device(device: str = "cpu") -> str:
    """The GPU's name for a CUDA device; else the CPU model (as /proc/cpuinfo names it), cores, Python."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
