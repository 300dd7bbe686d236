"""A process's own resource use, reported with each step's result (cluster/rank/worker.py) so the driver's
metrics need no extra calls: resident memory, and on a GPU the device memory allocated and
reserved by PyTorch's caching allocator and the device's utilisation."""

import os

import torch

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_utilization_works: bool | None = None  # torch.cuda.utilization needs pynvml (nvidia-ml-py)


def resident_bytes() -> int | None:
    """This process's resident set size (Linux /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


def process_stats(device: torch.device) -> dict:
    """`rss_bytes`; on CUDA also `device_allocated_bytes`, `device_reserved_bytes` and, when NVML is
    available, `device_utilization` (0..1 over the driver's last sample period)."""
    global _utilization_works
    stats = {}
    rss = resident_bytes()
    if rss is not None:
        stats["rss_bytes"] = rss
    if device.type == "cuda":
        stats["device_allocated_bytes"] = torch.cuda.memory_allocated(device)
        stats["device_reserved_bytes"] = torch.cuda.memory_reserved(device)
        if _utilization_works is not False:
            try:
                stats["device_utilization"] = torch.cuda.utilization(device) / 100.0
                _utilization_works = True
            except (ModuleNotFoundError, ImportError, RuntimeError):
                _utilization_works = False
    return stats
