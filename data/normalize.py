"""The network's input from a uint8 batch: the mean subtracted and, in training, each image's PCA
colour offset added, on the actor's device (PAPER.md §Data).

Torch only: the tower actors (cluster/rank/worker.py) import it, and bench/gpu_check.py runs
where only PyTorch is installed. On a CPU, a contiguous batch goes through the C extension
`data._normalize` when it is built: one pass instead of torch's two, the same bits
(data/_normalize.c). data/transforms.py makes the uint8 views and the offsets.
"""

from __future__ import annotations

import torch

try:  # built by setup.py; optional. Tensors reach it as numpy arrays (the buffer protocol)
    import numpy  # noqa: F401
    from data import _normalize
except ImportError:
    _normalize = None

MEAN_RGB: tuple[float, float, float] = (127.30, 119.72, 104.91)  # on 0–255 RGB (PAPER.md §Data)
# outputs of this size or more are written past the caches (non-temporal stores): about a CPU's
# last-level cache share; smaller ones are likely read again soon, from the cache
STREAM_BYTES = 8 << 20


def normalize_batch(
    images: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    memory_format: torch.memory_format = torch.contiguous_format,
    lighting: torch.Tensor | None = None,
) -> torch.Tensor:
    """Subtract :data:`MEAN_RGB`: (B, 3, H, W) uint8 → (B, 3, H, W) float32 on the same device.

    The paper only subtracts the mean: there is no division by a standard deviation or by 255.
    ``lighting`` (B, 3), when given, is each image's PCA colour offset
    (:func:`pca_lighting_offset`), added in the same pass.
    Writes into ``out`` when given (same shape, float32, same device; its memory format is
    kept), else allocates with ``memory_format`` (e.g. ``torch.channels_last``).
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be a (B, 3, H, W) uint8 tensor, got {images.dtype} {tuple(images.shape)}"
        )
    if out is None:
        out = torch.empty(
            images.shape, dtype=torch.float32, device=images.device, memory_format=memory_format
        )
    elif out.dtype != torch.float32 or out.shape != images.shape or out.device != images.device:
        raise ValueError(
            f"out must be float32 {tuple(images.shape)} on {images.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    shift = -torch.tensor(MEAN_RGB, dtype=torch.float32).view(1, 3)  # (1, 3)
    if lighting is not None:
        if lighting.shape != (images.shape[0], 3):
            raise ValueError(f"lighting must be ({images.shape[0]}, 3), got {tuple(lighting.shape)}")
        shift = lighting.to(torch.float32) + shift  # (B, 3): one offset per image and channel
    if _in_c(images, out):
        planes = shift.expand(images.shape[0], 3).contiguous()  # one offset per (image, channel)
        _normalize.normalize(images.numpy(), planes.numpy(), out.numpy(), images.shape[2] * images.shape[3],
                             out.numel() * out.element_size() >= STREAM_BYTES)
        return out
    out.copy_(images)
    out.add_(shift.to(images.device, non_blocking=True).view(-1, 3, 1, 1))  # mean and offset in one add
    return out


def _in_c(images: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether data._normalize can do it: built, on a CPU, both contiguous (NCHW) and not empty."""
    return (_normalize is not None and images.device.type == "cpu" and out.device.type == "cpu"
            and images.is_contiguous() and out.is_contiguous() and images.numel() > 0
            and not out.requires_grad)
