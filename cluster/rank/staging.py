"""Stage 0's input: the step's uint8 batch onto the actor's device, microbatch by microbatch, and
normalised there (mean subtracted, PCA colour offset added: data/normalize.py) as float32.

On a GPU the batch is first copied into a pinned host buffer kept from step to step, and each
microbatch then goes to the device with a non-blocking copy on a stream of its own: while
microbatch i computes, microbatch i + 1 is already crossing PCIe, so the copy overlaps the step.
The compute stream waits on the copy's event, not the host, so the step has no host
synchronisation here. A batch that is already on the device (bench/gpu_check.py's device-resident
data) is used as it is.

On a CPU the microbatch is normalised into a contiguous float buffer and converted to the
configured memory format afterwards: normalising straight into a channels_last buffer was about 5×
slower (docs/BENCHMARKS.md). Those float buffers are kept from step to step (`HostInputs`): a
fresh one costs the kernel a page fault and a zeroed page for every 4 kB of it on its first write,
which on this project's VM took over ten times as long as the normalisation itself.
"""

import math
import warnings

import torch
from torch import Tensor

from data.normalize import normalize_batch


def from_object_store(array) -> Tensor | None:
    """A batch's array as a tensor sharing its memory. The loaders return numpy arrays
    (cluster/rank/loader.py), which Ray reads out of the node's object store without a copy,
    read-only; nothing here writes into a batch (it is normalised into a buffer of its own), so
    torch's warning about read-only memory does not apply. Tensors (tests, benches) and None pass
    as they are."""
    if array is None or isinstance(array, Tensor):
        return array
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class StagedBatch:
    """`get(i)`: microbatch i of `images` (B, 3, h, w) uint8 in rows of `rows`, ready for stage 0."""

    def __init__(self, images: Tensor, lighting: Tensor | None, rows: int, device: torch.device,
                 memory_format: torch.memory_format, pinned: "PinnedBuffer | None" = None,
                 host: "HostInputs | None" = None):
        """`pinned`: the page-locked buffer a GPU's batch is copied through; `host`: the float
        buffers a CPU's microbatches are normalised into (each kept by the actor; None: new
        tensors)."""
        self.device, self.memory_format = device, memory_format
        self.host = host if device.type == "cpu" else None
        self.count = images.shape[0] // rows
        self.cuda = device.type == "cuda"
        self.pinned = pinned if self.cuda and images.device.type != "cuda" else None
        if self.pinned is not None:
            images = self.pinned.hold(images)
        self.chunks = images.split(rows)
        self.shifts = lighting.split(rows) if lighting is not None else [None] * len(self.chunks)
        self._copies: dict[int, tuple[Tensor, torch.cuda.Event | None]] = {}
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        if self.cuda:
            self._start(0)

    def _start(self, i: int) -> None:
        """Begin microbatch i's host-to-device copy on the copy stream."""
        if i >= self.count or i in self._copies:
            return
        chunk = self.chunks[i]
        if chunk.device == self.device:
            self._copies[i] = (chunk, None)
            return
        with torch.cuda.stream(self._stream):
            on_device = chunk.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        self._copies[i] = (on_device, done)
        if self.pinned is not None and i == self.count - 1:
            self.pinned.in_use_until(done)  # the next step's batch must not overwrite it before

    def get(self, i: int) -> Tensor:
        if not self.cuda:
            return self._on_cpu(i)
        self._start(i)
        on_device, done = self._copies.pop(i)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
            on_device.record_stream(torch.cuda.current_stream(self.device))  # made on the copy stream
        self._start(i + 1)  # the next microbatch crosses while this one computes
        shift = self.shifts[i]
        if shift is not None:
            shift = shift.to(self.device, non_blocking=True)
        return normalize_batch(on_device, memory_format=self.memory_format, lighting=shift)

    def _on_cpu(self, i: int) -> Tensor:
        chunk = self.chunks[i]
        if self.host is None:
            return normalize_batch(chunk, lighting=self.shifts[i]).contiguous(memory_format=self.memory_format)
        x = normalize_batch(chunk, self.host.take(i, chunk.shape), lighting=self.shifts[i])
        if self.memory_format == torch.contiguous_format:
            return x
        return self.host.take(i, chunk.shape, self.memory_format).copy_(x)


class HostInputs:
    """A CPU actor's float32 inputs, one buffer per (microbatch, memory format), grown as needed
    and kept from step to step: microbatch i of every step is normalised into the same memory.

    Why: a microbatch of 64 at 224² is 38.5 MB of float32. glibc hands an allocation that large
    (above its 32 MB mmap ceiling) fresh from the kernel every time, and often one of half that
    size, and each 4 kB page of it then faults and is zeroed on its first write. Measured on
    this project's 2-core VM, normalising a microbatch of 64 into a new tensor took 414 µs an
    image (9,400 page faults) against 30 µs into a kept one; of 32, 115-140 against 31 µs (2,200
    faults); of 16, the same (glibc reused the memory).

    Safe because nothing outlives its step: microbatch i's input is saved by the first layer for
    its weight gradient, and the step's backward is done before the next step asks for
    microbatch i again. A training step's microbatches have buffers of their own, as a pipeline
    schedule has several in flight. Without autograd (an evaluation) nothing keeps an input once
    its microbatch's forward has returned, and stage 0 asks for the next one only then, so they
    all share one buffer: a 10-view evaluation batch is ten times a training batch."""

    def __init__(self):
        self._buffers: dict[tuple[int, torch.memory_format], Tensor] = {}

    def take(self, i: int, shape: torch.Size, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
        """Microbatch i's buffer as a float32 tensor of `shape` (N, C, H, W) in `memory_format`
        (with autograd off, the one buffer of every microbatch)."""
        n = math.prod(shape)
        key = (i if torch.is_grad_enabled() else 0, memory_format)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < n:
            buffer = self._buffers[key] = torch.empty(n, dtype=torch.float32)
        if memory_format == torch.channels_last:
            batch, channels, height, width = shape
            return buffer[:n].view(batch, height, width, channels).permute(0, 3, 1, 2)
        return buffer[:n].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())


class PinnedBuffer:
    """A page-locked host buffer, grown as needed and kept between steps: a copy from it to the
    GPU can run asynchronously (from pageable memory it cannot)."""

    def __init__(self):
        self._buffer: Tensor | None = None
        self._busy: torch.cuda.Event | None = None  # the last copy out of it

    def in_use_until(self, event: torch.cuda.Event) -> None:
        self._busy = event

    def hold(self, images: Tensor) -> Tensor:
        """`images` copied into the buffer (once the last copy out of it is done); a view of it."""
        if self._busy is not None:
            self._busy.synchronize()  # long done in practice: the previous step's last microbatch
            self._busy = None
        n = images.numel()
        if self._buffer is None or self._buffer.numel() < n:
            self._buffer = torch.empty(n, dtype=images.dtype, pin_memory=True)
        view = self._buffer[:n].view(images.shape)
        view.copy_(images)
        return view
