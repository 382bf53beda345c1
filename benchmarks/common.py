"""What every benchmark table names: the machine it was measured on."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
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


def reset_peak_rss() -> None:
    """Start the process's resident-memory high-water mark afresh (Linux >= 4.0), so that the peak
    measured is the timed work's, not the model loading's."""
    with contextlib.suppress(OSError):  # elsewhere the peak is the whole process's (ru_maxrss)
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
