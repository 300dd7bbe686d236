"""Deterministic, resumable, data-parallel batches from WebDataset shards.

Design
------
**Index.** Each complete sample, a key with an image member (``jpg``/``jpeg``) and a valid
label, becomes one index entry: its shard, the byte offset and size of its image member, and its
label; ``index`` below is a sample's position in this index (shard order, then member order).
Where it comes from (:attr:`ShardBatches.index_source`):

- ``"manifest"``: the shards were written by ``data.convert``, whose ``manifest.json`` beside
  them lists every shard's sample count, size and sha256. When it lists every shard of the
  pattern with its current size, N and each shard's share of the index come from it and no tar
  is opened at construction. A shard's entries are read from its tar headers when one of its
  samples is first decoded, and must match the manifest's count (else :class:`DataError`: the
  manifest is stale). A manifest that does not match (a shard it does not list, another size)
  is reported in one warning line and the shards are scanned instead.
- ``"scan"`` (no converter manifest): every shard's tar headers are scanned at construction
  (``tarfile``; no image is read or decoded, the tiny ``cls`` members are read), ``num_threads``
  shards at a time. Cheap for the demo; ImageNet's 2.6M members take a while per process.

Structural problems are excluded by the scan and counted by reason in
:attr:`ShardBatches.read_stats` (an :class:`IndexStats`, a :class:`ReadStats`):

- ``broken tar``: a corrupt or truncated tar; the rest of that shard, including a sample it cut
  short, is skipped and counted once;
- ``missing jpg``, ``missing cls``;
- ``cls not an integer`` (not ASCII decimal >= 0);
- ``label out of range`` (``cls >= num_classes``, when ``num_classes`` is given; a manifest
  whose classes do not all fit is not used, so that the scan counts them).

Each reason is logged once per shard, naming the shard and the first such key. Every replica
reads the same files, so all agree on the index and on ``num_samples`` (N); :attr:`fingerprint`
(a hash of the shard names and the index, or of the manifest's names, counts and sha256) lets a
caller check that across processes. Nothing is cached on disk.

**Epoch order.** Training visits a permutation of ``range(N)`` drawn from ``(seed, epoch)``;
evaluation visits ``range(N)`` in index order. Replica ``r`` of ``R`` takes positions
``r, r+R, r+2R, ...`` of that order, ``batch_size`` (B) at a time:

- training keeps the first ``N - N % (R*B)`` positions, so every replica has exactly
  ``N // (R*B)`` full batches; the ``N % (R*B)`` samples at the end of the permutation (other
  ones each epoch) are the documented remainder, not seen that epoch;
- evaluation keeps every sample: each replica has ``ceil(N / (R*B))`` batches, and rows past its
  last sample are padding (a zero image, label 0, weight 0), so every sample is scored exactly
  once across replicas and every replica runs the same number of equally shaped batches.

**Augmentation.** Sample ``index`` in epoch ``epoch`` draws from
``numpy.random.default_rng([seed, epoch, index])`` in a fixed order: the crop (top, left, flip,
:class:`TrainTransform`), then the PCA colour offset (:func:`pca_lighting_offset`) when lighting
is on in that epoch (``lighting_epochs`` can turn it off from an epoch on, as the 2012 run did;
the offset is drawn last, so the crops do not change). That generator is built as numpy builds
it, but for a whole batch's samples at once (data/seeding.py: ~3.5 µs a sample against numpy's
~16). Since ``index`` is global, a sample's view does not depend on the batch size, the replica
count, the thread count or the resume point. The crop is drawn before the image is decoded, so
that only the part of the image the view needs is decoded (:meth:`TrainTransform.from_jpeg`,
libjpeg-turbo's region decode in the extension ``data._jpegroi``); that part is bit for bit
what a full decode gives, and a file it cannot take (or every file, when the extension is not
built) is decoded whole, so the views are the same either way.

**Bad images at load time.** Image bytes are first read when a batch needs them. A sample whose
bytes cannot be read (``unreadable image``) or decoded (``undecodable image``) is counted once
under that reason, logged once per shard, and remembered. Training substitutes it with the next
sample of the epoch's global order that decodes (wrapping around), augmented with that sample's
own draws, so batches stay full and the choice depends only on the files, never on timing or
the resume point. Evaluation does not substitute: the row gets weight 0 (and a zero image), so
the sample is not scored.

**Bad fraction.** ``bad / total > max_bad_fraction`` raises :class:`DataError`, where ``bad``
counts every bad sample found so far (at the scan, plus distinct load-time failures) and
``total`` is every sample found in the shards (N plus the scan's skips; a broken tar's lost rest
counts as one). It is checked after the scan and at every new load-time failure; the load-time
part only counts what this reader has decoded (a resumed reader starts afresh).

**Threads.** ``num_threads`` threads decode the rows of a batch (simplejpeg, PIL and
``data._jpegroi`` release the GIL) and write straight into it; rows keep their places, so
results do not depend on the thread count. Image bytes are read with ``os.pread`` from a small
LRU of open shard files.

**Resume.** :meth:`ShardBatches.state_dict` gives a small JSON-able dict (position plus what
identifies the reader: seed, train, replica, replicas, batch size, N, fingerprint).
:meth:`ShardBatches.check_state` checks it against a reader and returns ``(epoch, next_batch)``;
``epoch_batches(epoch, start_batch=next_batch)`` then yields exactly the batches an
uninterrupted run would have yielded from there, bit for bit. The view settings (resize, crop,
lighting, views) are configuration, not position, and are not checked.

Each data-parallel replica builds its own reader with ``replica=r``; the towers of a replica
either share one or build identical ones (same arguments, same batches).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pickle
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

import numpy as np

from data.convert import FORMAT as _MANIFEST_FORMAT
from data.convert import MANIFEST as _MANIFEST
from data.seeding import sample_rng, sample_words
from data.shards import _IMAGE_SUFFIXES, ReadStats, TarSamples, expand_shards, label_problem
from data.transforms import (
    LIGHTING_VARIANTS,
    TrainTransform,
    decode_rgb,
    pca_lighting_offset,
    view_transform,
)

__all__ = ["Batch", "BatchArrays", "DataError", "IndexStats", "ShardBatches", "decoded_in_process", "scan_shard"]

log = logging.getLogger(__name__)

_ORDER_STREAM = (1,)  # spawn key that keeps the order stream apart from the per-sample streams
_STATE_FORMAT = "ShardBatches/1"  # version tag of state_dict()
_CLS_MAX_BYTES = 32  # a longer cls member is not a class index; don't read it
_OPEN_FILES = 8  # shard files kept open (at least 2 per thread)
_T = TypeVar("_T")


class DataError(ValueError):
    """Too much of the data is bad (more than ``max_bad_fraction``), or none of it decodes."""


@dataclasses.dataclass(frozen=True)
class BatchArrays:
    """One step's batch for one replica, as numpy arrays (:meth:`ShardBatches.arrays`: what a
    loader actor makes and ships, with no PyTorch in its process)."""

    images: np.ndarray  # uint8 (B, 3, crop, crop), or (B, 10, 3, crop, crop) with views=10
    labels: np.ndarray  # int64 (B,)
    lighting: np.ndarray | None  # float32 (B, 3) PCA colour offsets, 0–255 scale; or None
    weights: np.ndarray | None  # float32 (B,): 1 real, 0 padding/unscorable; None when all 1
    epoch: int
    index: int  # batch index within this replica's epoch
    indices: np.ndarray  # int64 (B,): sample index of each row, -1 for padding


@dataclasses.dataclass(frozen=True)
class Batch:
    """One step's batch for one replica, as tensors (:meth:`ShardBatches.batch`): the same memory
    as its :class:`BatchArrays`."""

    images: "torch.Tensor"  # uint8 (B, 3, crop, crop), or (B, 10, 3, crop, crop) with views=10
    labels: "torch.Tensor"  # int64 (B,)
    lighting: "torch.Tensor | None"  # float32 (B, 3) PCA colour offsets, 0–255 scale; or None
    weights: "torch.Tensor | None"  # float32 (B,): 1 real, 0 padding/unscorable; None when all 1
    epoch: int
    index: int  # batch index within this replica's epoch
    indices: "torch.Tensor | None" = None  # int64 (B,): sample index of each row, -1 for padding

    @classmethod
    def of(cls, arrays: BatchArrays) -> "Batch":
        """The batch of ``arrays`` as tensors sharing their memory."""
        import torch

        def tensor(array):
            return None if array is None else torch.from_numpy(array)

        return cls(tensor(arrays.images), tensor(arrays.labels), tensor(arrays.lighting), tensor(arrays.weights),
                   arrays.epoch, arrays.index, tensor(arrays.indices))


@dataclasses.dataclass
class IndexStats(ReadStats):
    """:class:`ReadStats` whose reasons are fixed names (details go to the log), logged once per
    shard and reason."""

    logged: set = dataclasses.field(default_factory=set, repr=False, compare=False)

    def skip(self, reason: str, key: str, path: str, detail: str = "") -> None:
        """Count one skipped sample under ``reason``; log the first per (shard, reason)."""
        self.skipped += 1
        self.reasons[reason] += 1
        if (path, reason) not in self.logged:
            self.logged.add((path, reason))
            log.warning(
                "skipped sample %r in %s: %s%s (further ones for this reason in this shard are "
                "only counted)",
                key,
                path,
                reason,
                f" ({detail})" if detail else "",
            )

    def merge(self, other: ReadStats) -> None:
        """Add ``other``'s counts to these."""
        self.samples += other.samples
        self.skipped += other.skipped
        self.reasons.update(other.reasons)
        self.logged |= getattr(other, "logged", set())

    def summary(self) -> str:
        """``"2 broken tar, 1 missing cls"``, or ``"none"``."""
        return ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items())) or "none"


# ---------------------------------------------------------------- index


def scan_shard(
    path: str, stats: IndexStats, num_classes: int | None = None
) -> list[tuple[str, int, int, int]]:
    """Index one shard from its tar headers: ``(key, image offset, image size, label)`` of each
    complete, well-labelled sample, in member order. Image bytes are not read.

    Bad samples and a broken rest of the shard are skipped and counted in ``stats`` under the
    reasons in the module docstring.
    """
    entries: list[tuple[str, int, int, int]] = []
    samples = TarSamples(path, _add_index_member)
    for key, members in samples:
        entry = _index_entry(key, members, path, stats, num_classes)
        if entry is not None:
            entries.append(entry)
    broken = samples.broken
    if broken is not None:
        if {"jpg", "cls"} <= broken.members.keys():  # else it is part of the lost rest
            key = broken.key or "*"  # never None here: the members came from a sample
            entry = _index_entry(key, broken.members, path, stats, num_classes)
            if entry is not None:
                entries.append(entry)
        stats.skip("broken tar", broken.key or "*", path, f"{broken.reason}; rest of shard skipped")
    return entries


def _add_index_member(
    members: dict, suffix: str, info: tarfile.TarInfo, read: Callable[[], bytes]
) -> None:
    """What the index keeps of a member: a short ``cls``'s bytes, the first image's place."""
    if suffix == "cls":
        members["cls"] = read() if info.size <= _CLS_MAX_BYTES else b"<long>"
    elif suffix in _IMAGE_SUFFIXES:
        members.setdefault("jpg", (info.offset_data, info.size))


def _index_entry(
    key: str, members: dict, path: str, stats: IndexStats, num_classes: int | None
) -> tuple[str, int, int, int] | None:
    """The index entry of one sample's members, or None after counting why it is skipped."""
    problem = label_problem(members, num_classes)
    if problem is not None:
        stats.skip(problem[0], key, path, problem[1])
        return None
    stats.samples += 1
    offset, size = members["jpg"]
    return key, offset, size, int(members["cls"].strip())


class _OpenFiles:
    """A thread-safe LRU of open shard files, read with ``os.pread``; a file evicted while a
    thread reads it is closed when that read ends."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[str, list] = collections.OrderedDict()  # [file, users]

    def read(self, path: str, offset: int, size: int) -> bytes:
        with self._lock:
            entry = self._open.get(path)
            if entry is None:
                entry = self._open[path] = [open(path, "rb", buffering=0), 0]  # noqa: SIM115
                while len(self._open) > self._capacity:
                    _, old = self._open.popitem(last=False)
                    if old[1] == 0:
                        old[0].close()
            else:
                self._open.move_to_end(path)
            entry[1] += 1
        try:
            data = os.pread(entry[0].fileno(), size, offset)
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0 and self._open.get(path) is not entry:
                    entry[0].close()
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset}")
        return data

    def close(self) -> None:
        with self._lock:
            for file, users in self._open.values():
                if users == 0:
                    file.close()
            self._open.clear()


# ---------------------------------------------------------------- batches


class ShardBatches:
    """Batches (:class:`Batch`) of one data-parallel replica from the shards named by
    ``pattern``; see the module docstring for the scheme.

    Attributes set at construction: ``num_samples`` (N), ``batches_per_epoch``, ``read_stats``,
    ``fingerprint``, and ``index_source`` (``"manifest"`` or ``"scan"``: where N came from).

    Pickling keeps the settings and the index (not open files nor the load-time bad list).
    """

    def __init__(
        self,
        pattern: str,
        batch_size: int,
        *,
        train: bool,
        seed: int,
        resize: int = 256,
        crop: int = 224,
        replica: int = 0,
        replicas: int = 1,
        lighting: str | None = "paper",
        lighting_epochs: int | None = None,
        views: int = 1,
        num_classes: int | None = None,
        max_bad_fraction: float = 0.001,
        num_threads: int = 1,
    ) -> None:
        """
        Args:
            pattern: Shard pattern, see :func:`data.shards.expand_shards`.
            batch_size: Samples per batch of this replica.
            train: Shuffle, augment and drop the remainder (True), or keep index order,
                take fixed views and pad (False).
            seed: Seed of the order and of every augmentation draw; an int >= 0.
            resize: Side of the square the shorter side is rescaled and centre-cropped to.
            crop: Side of the crop the network sees.
            replica: This data-parallel replica, in ``[0, replicas)``.
            replicas: Data-parallel replicas; each reads a disjoint share of every epoch.
            lighting: PCA colour noise variant (``"paper"``, ``"cuda-convnet-2012"``) or None;
                only used when training.
            lighting_epochs: The colour noise is on in epochs ``0 .. lighting_epochs - 1`` only
                (the 2012 run turned it off after epoch 67); None: in every epoch. A per-epoch
                decision, so a batch stays a function of (seed, epoch, replica, batch).
            views: Evaluation views: 1 (centre crop) or 10 (corners, centre and their flips).
            num_classes: When given, a label outside ``[0, num_classes)`` is a bad sample.
            max_bad_fraction: Largest tolerated share of bad samples, in [0, 1].
            num_threads: Threads that scan shards and decode a batch (1: the calling thread).
        """
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        _check_int("replicas", replicas, 1)
        _check_int("num_threads", num_threads, 1)
        _check_int("replica", replica, 0)
        if replica >= replicas:
            raise ValueError(f"replica must be in [0, replicas={replicas}), got {replica}")
        if lighting is not None and lighting not in LIGHTING_VARIANTS:
            raise ValueError(
                f"lighting must be None or one of {', '.join(LIGHTING_VARIANTS)}, got {lighting!r}"
            )
        if lighting_epochs is not None:
            _check_int("lighting_epochs", lighting_epochs, 0)
        if views not in (1, 10):
            raise ValueError(f"views must be 1 or 10, got {views!r}")
        if train and views != 1:
            raise ValueError(f"views={views} is for evaluation; training takes one random view")
        if num_classes is not None:
            _check_int("num_classes", num_classes, 1)
        if isinstance(max_bad_fraction, bool) or not (
            isinstance(max_bad_fraction, (int, float)) and 0.0 <= max_bad_fraction <= 1.0
        ):
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
        self.pattern, self.batch_size, self.train, self.seed = pattern, batch_size, train, seed
        self.replica, self.replicas = replica, replicas
        self.lighting = lighting if train else None
        self.lighting_epochs = lighting_epochs
        self.views, self.num_classes = views, num_classes
        self.max_bad_fraction, self.num_threads = float(max_bad_fraction), num_threads
        self.resize, self.crop = resize, crop
        self._train_view = TrainTransform(resize, crop)
        self._eval_view = view_transform(resize, crop, views)
        self._build_index(expand_shards(pattern))
        self._init_runtime()
        if self.train and self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.num_samples} samples in {pattern!r} make no full batch of {batch_size} "
                f"for each of {replicas} replica(s); lower batch_size"
            )

    # ------------------------------------------------------------ index

    def _build_index(self, paths: list[str]) -> None:
        """Fill the index arrays, read_stats and the fingerprint: from the converter's manifest
        when it matches the shards (no shard is opened), else by scanning every shard."""
        self._paths = paths
        self._pending: set[int] = set()  # shards whose entries are not read yet (manifest)
        self._keys: np.ndarray | None = None  # (N,) only for messages (scan)
        self._shard_keys: dict[int, list[str]] = {}  # shard → its keys (manifest)
        listed = _manifest_counts(paths, self.num_classes)
        if listed is None:
            self._scan_index(paths)
        else:
            self._manifest_index(paths, *listed)
        if self.read_stats.skipped:
            log.warning(
                "%s: %d good samples; skipped %s",
                self.pattern,
                self.num_samples,
                self.read_stats.summary(),
            )
        self._check_bad_fraction()
        if self.num_samples == 0:
            raise ValueError(f"shard pattern {self.pattern!r} holds no readable samples")

    def _scan_index(self, paths: list[str]) -> None:
        """Scan every shard's tar headers (``num_threads`` at a time)."""
        self.index_source = "scan"
        scans = list(self._scan_map(self._scan_one, paths))
        self.read_stats = IndexStats()
        keys, shards, offsets, sizes, labels = [], [], [], [], []
        for shard, (entries, stats) in enumerate(scans):
            self.read_stats.merge(stats)
            for key, offset, size, label in entries:
                keys.append(key.encode("utf-8", "surrogateescape"))
                shards.append(shard)
                offsets.append(offset)
                sizes.append(size)
                labels.append(label)
        self._keys = np.array(keys, dtype=np.bytes_)
        self._shards = np.array(shards, dtype=np.int32)  # (N,) into self._paths
        self._offsets = np.array(offsets, dtype=np.int64)  # (N,) byte offset of the image
        self._sizes = np.array(sizes, dtype=np.int64)  # (N,) image bytes
        self._labels = np.array(labels, dtype=np.int64)  # (N,)
        self._n = len(labels)
        self._starts = np.searchsorted(self._shards, np.arange(len(paths) + 1))  # (S+1,)
        self._total = self.num_samples + self.read_stats.skipped  # every sample found
        digest = hashlib.sha256()
        for path in paths:
            digest.update(f"{os.path.basename(path)}\0".encode())
        for array in (self._keys, self._shards, self._offsets, self._sizes, self._labels):
            digest.update(array.tobytes())
        self.fingerprint = digest.hexdigest()[:16]

    def _manifest_index(self, paths: list[str], counts: list[int], digests: list[str]) -> None:
        """Take N and each shard's share from the manifest; a shard's entries (offsets, sizes,
        labels, keys) are read when one of its samples is first decoded (``_load_shard``)."""
        self.index_source = "manifest"
        counts_array = np.array(counts, dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts_array)])  # (S+1,)
        n = int(self._starts[-1])
        self._shards = np.repeat(np.arange(len(paths), dtype=np.int32), counts_array)  # (N,)
        self._offsets = np.zeros(n, dtype=np.int64)  # filled by _load_shard
        self._sizes = np.zeros(n, dtype=np.int64)
        self._labels = np.zeros(n, dtype=np.int64)
        self._n = n
        self._pending = set(range(len(paths)))
        self.read_stats = IndexStats(samples=n)
        self._total = n
        digest = hashlib.sha256(b"manifest\0")
        for path, count, sha256 in zip(paths, counts, digests, strict=True):
            digest.update(f"{os.path.basename(path)}\0{count}\0{sha256}\0".encode())
        self.fingerprint = digest.hexdigest()[:16]

    def _load_shard(self, shard: int) -> None:
        """Read the entries of a shard the manifest counted, once (any thread may ask)."""
        with self._index_lock:
            if shard not in self._pending:
                return
            path = self._paths[shard]
            stats = IndexStats()
            entries = scan_shard(path, stats, self.num_classes)
            first, last = int(self._starts[shard]), int(self._starts[shard + 1])
            if stats.skipped or len(entries) != last - first:
                raise DataError(
                    f"{path} holds {len(entries)} good samples (skipped: {stats.summary()}), but "
                    f"its {_MANIFEST} says {last - first}: the manifest is stale; delete it (the "
                    "reader then scans the shards) or convert the data again"
                )
            self._offsets[first:last] = [offset for _, offset, _, _ in entries]
            self._sizes[first:last] = [size for _, _, size, _ in entries]
            self._labels[first:last] = [label for _, _, _, label in entries]
            self._shard_keys[shard] = [key for key, _, _, _ in entries]
            self._pending.discard(shard)

    def _key(self, index: int) -> str:
        """Sample ``index``'s key (its shard is indexed)."""
        if self._keys is not None:
            return self._keys[index].decode("utf-8", "surrogateescape")
        shard = int(self._shards[index])
        return self._shard_keys[shard][index - int(self._starts[shard])]

    def _scan_map(self, fn: Callable, items: list) -> list:
        """``map`` over the shards at construction, ``num_threads`` at a time."""
        if self.num_threads == 1:
            return list(map(fn, items))
        with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
            return list(pool.map(fn, items))

    def _scan_one(self, path: str) -> tuple[list, IndexStats]:
        stats = IndexStats()
        return scan_shard(path, stats, self.num_classes), stats

    def _check_bad_fraction(self) -> None:
        """Raise DataError when the bad samples found so far exceed max_bad_fraction."""
        bad, total = self.read_stats.skipped, max(self._total, 1)
        if bad / total > self.max_bad_fraction:
            raise DataError(
                f"{self.pattern!r}: {bad} of {total} samples are bad ({bad / total:.2%}; "
                f"{self.read_stats.summary()}), more than max_bad_fraction="
                f"{self.max_bad_fraction:g}; fix the shards or raise max_bad_fraction"
            )

    def _init_runtime(self) -> None:
        self._files = _OpenFiles(max(_OPEN_FILES, 2 * self.num_threads))
        self._lock = threading.Lock()
        self._index_lock = threading.Lock()
        self._bad: dict[int, str] = {}  # index → reason, for samples that failed at load time
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # the decoding threads
        self._plans: dict[int, tuple] = {}  # epoch → _plan(epoch), the newest few
        self.decoded = 0  # images this reader decoded (a substitute for a bad one counts too)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in ("_files", "_lock", "_index_lock", "_bad", "_pool", "_plans", "decoded"):
            del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def for_replica(self, replica: int) -> "ShardBatches":
        """The reader of another replica of the same ``replicas``: the index is copied, not built
        again (a scan reads every shard's headers)."""
        _check_int("replica", replica, 0)
        if replica >= self.replicas:
            raise ValueError(f"replica must be in [0, replicas={self.replicas}), got {replica}")
        other = pickle.loads(pickle.dumps(self))
        other.replica = replica
        return other

    def close(self) -> None:
        """Close the open shard files and stop the decoding threads (reading again reopens them)."""
        self._files.close()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # ------------------------------------------------------------ sizes

    @property
    def num_samples(self) -> int:
        """Good samples in the index (N)."""
        return self._n

    @property
    def batches_per_epoch(self) -> int:
        """Batches :meth:`epoch_batches` yields per epoch; the same for every replica."""
        per_step = self.replicas * self.batch_size
        if self.train:
            return self.num_samples // per_step
        return math.ceil(self.num_samples / per_step)

    # ------------------------------------------------------------ order

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices in the order epoch ``epoch`` visits them, all replicas together: (N,)."""
        if not self.train:
            return np.arange(self.num_samples)
        entropy = np.random.SeedSequence([self.seed, epoch], spawn_key=_ORDER_STREAM)
        return np.random.default_rng(entropy).permutation(self.num_samples)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Planned sample index of every row of this replica's epoch:
        (batches_per_epoch, batch_size) int64, -1 for evaluation padding (before any
        load-time substitution)."""
        return self._plan(epoch)[2]

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order (N,), positions in order (batches, B), indices (batches, B)); -1 = padding."""
        order = self.epoch_order(epoch)
        batches, size = self.batches_per_epoch, self.batch_size
        positions = np.arange(self.replica, self.num_samples, self.replicas)
        slots = batches * size
        if len(positions) >= slots:
            positions = positions[:slots]
        else:  # evaluation: pad this replica's share to the common batch count
            positions = np.concatenate([positions, np.full(slots - len(positions), -1)])
        positions = positions.reshape(batches, size)
        indices = np.where(positions >= 0, order[np.maximum(positions, 0)], -1)
        return order, positions, indices

    # ------------------------------------------------------------ batches

    def _check_position(self, epoch: int, name: str, batch: int) -> None:
        """A one-line ValueError unless ``epoch`` >= 0 and 0 <= ``batch`` <= batches_per_epoch."""
        _check_int("epoch", epoch, 0)
        _check_int(name, batch, 0)
        if batch > self.batches_per_epoch:
            raise ValueError(f"{name} must be <= batches_per_epoch={self.batches_per_epoch}, got {batch}")

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield this replica's batches ``start_batch, start_batch + 1, ...`` of epoch ``epoch``."""
        self._check_position(epoch, "start_batch", start_batch)
        for b in range(start_batch, self.batches_per_epoch):
            yield self.batch(epoch, b)

    def batch(self, epoch: int, b: int) -> Batch:
        """This replica's batch ``b`` of epoch ``epoch``, in any order of calls: the same bits as
        :meth:`epoch_batches` gives (a loader actor makes every K-th batch)."""
        return Batch.of(self.arrays(epoch, b))

    def arrays(self, epoch: int, b: int) -> BatchArrays:
        """:meth:`batch` as numpy arrays."""
        self._check_position(epoch, "batch", b)
        if b == self.batches_per_epoch:
            raise ValueError(f"batch must be < batches_per_epoch={self.batches_per_epoch}, got {b}")
        plan = self._plans.get(epoch)
        if plan is None:
            plan = self._plans[epoch] = self._plan(epoch)
            for old in sorted(self._plans)[:-2]:  # an epoch's plan is (N,) arrays: keep two
                del self._plans[old]
        order, positions, indices = plan
        return self._batch(epoch, b, order, positions[b], indices[b], self._map)

    def _batch(
        self,
        epoch: int,
        b: int,
        order: np.ndarray,
        positions: np.ndarray,
        indices: np.ndarray,
        map_fn: Callable,
    ) -> BatchArrays:
        size = self.batch_size
        shape = (
            (size, 10, 3, self.crop, self.crop)
            if self.views == 10
            else (size, 3, self.crop, self.crop)
        )
        images = (np.empty if self.train else np.zeros)(shape, dtype=np.uint8)

        # each training row's generator, default_rng([seed, epoch, index]), from one hash of all rows
        words = sample_words(self.seed, epoch, indices) if self.train else None  # (no -1 padding rows: training)

        def fill(row: int) -> tuple[int, np.ndarray | None, float]:
            return self._fill(images, row, int(indices[row]), int(positions[row]), order, epoch,
                              None if words is None else words[row])

        rows = list(map_fn(fill, range(size)))
        used = np.array([index for index, _, _ in rows], dtype=np.int64)  # (B,)
        labels = np.where(used >= 0, self._labels[np.maximum(used, 0)], 0)  # (B,) int64
        lighting = None
        if self.lighting_in(epoch) is not None:
            lighting = np.stack([shift for _, shift, _ in rows])  # (B, 3) float32
        weights = np.array([w for _, _, w in rows], dtype=np.float32)  # (B,)
        return BatchArrays(
            images, labels, lighting, None if bool(weights.all()) else weights, epoch, b, used
        )

    def _fill(
        self,
        images: np.ndarray,
        row: int,
        index: int,
        position: int,
        order: np.ndarray,
        epoch: int,
        words: np.ndarray | None,
    ) -> tuple[int, np.ndarray | None, float]:
        """Write row ``row``'s view into ``images``; return (sample index used, lighting
        offset or None, weight). ``words``: sample ``index``'s seed words (data/seeding.py), in
        training."""
        if index < 0:  # evaluation padding
            return -1, None, 0.0
        if not self.train:
            image = self._decode(index, decode_rgb)
            if image is None:
                return index, None, 0.0
            images[row] = self._eval_view(image)
            return index, None, 1.0
        n, out = self._n, images[row]
        for step in range(n):  # substitute a bad sample by the next good one
            if step:  # the next sample in the order stands in: its own generator
                index = int(order[(position + step) % n])
                words = sample_words(self.seed, epoch, np.array([index]))[0]
            rng = sample_rng(words)
            # draws top, left, flip, then decodes only the part of the image the view needs
            view = functools.partial(self._train_view.from_jpeg, rng=rng, out=out)
            if self._decode(index, view) is not None:
                break
        else:
            raise DataError(
                f"{self.pattern!r}: no sample decodes ({self.read_stats.summary()}); "
                f"max_bad_fraction={self.max_bad_fraction:g} let it get this far"
            )
        variant = self.lighting_in(epoch)  # drawn last: without it the crop's draws are the same
        shift = pca_lighting_offset(rng, variant) if variant is not None else None
        return index, shift, 1.0

    def lighting_in(self, epoch: int) -> str | None:
        """The PCA colour noise variant of epoch ``epoch``'s batches, or None for none."""
        if self.lighting_epochs is not None and epoch >= self.lighting_epochs:
            return None
        return self.lighting

    def _decode(self, index: int, decode: Callable[[bytes], _T]) -> _T | None:
        """``decode`` of sample ``index``'s image bytes; None when they cannot be read or
        decoded (``decode`` raises ValueError), counted, or the sample is known to be bad."""
        if index in self._bad:
            return None
        shard = int(self._shards[index])
        if shard in self._pending:
            self._load_shard(shard)
        path = self._paths[shard]
        try:
            data = self._files.read(path, int(self._offsets[index]), int(self._sizes[index]))
        except OSError as err:
            self._count_bad(index, "unreadable image", path, str(err))
            return None
        try:
            decoded = decode(data)
        except ValueError as err:
            self._count_bad(index, "undecodable image", path, str(err))
            return None
        with self._lock:
            self.decoded += 1
        _count_decoded()
        return decoded

    def _count_bad(self, index: int, reason: str, path: str, detail: str) -> None:
        with self._lock:
            if index in self._bad:
                return
            self._bad[index] = reason
            self.read_stats.skip(reason, self._key(index), path, detail)
            self._check_bad_fraction()

    def _map(self, fn: Callable, items: Iterable) -> Iterable:
        """An order-keeping ``map``: the built-in one, or the decoding threads'."""
        if self.num_threads == 1:
            return map(fn, items)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix="decode")
        return self._pool.map(fn, items)

    def bad_samples(self) -> dict[int, str]:
        """Samples this reader found unreadable or undecodable so far: index → reason."""
        with self._lock:
            return dict(self._bad)

    # ------------------------------------------------------------ resume

    def _identity(self) -> dict:
        """What a saved position is only valid for."""
        return {
            "seed": self.seed,
            "train": self.train,
            "replica": self.replica,
            "replicas": self.replicas,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "fingerprint": self.fingerprint,
        }

    def state_dict(self, epoch: int, next_batch: int) -> dict:
        """The loader's position as a small JSON-able dict: epoch ``epoch``, next batch
        ``next_batch`` (``batches_per_epoch`` = the epoch is done), plus this reader's identity."""
        self._check_position(epoch, "next_batch", next_batch)
        return {
            "format": _STATE_FORMAT,
            "epoch": epoch,
            "next_batch": next_batch,
            **self._identity(),
        }

    def check_state(self, state: Mapping) -> tuple[int, int]:
        """Check a :meth:`state_dict` against this reader; return ``(epoch, next_batch)``.

        Raises:
            ValueError: one line naming every field that differs (another dataset, seed,
                replica layout or batch size), or a malformed state.
        """
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            got = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not a {_STATE_FORMAT} loader state (format {got!r})")
        diffs = [
            f"{name} {state.get(name)!r} != {ours!r}"
            for name, ours in self._identity().items()
            if state.get(name) != ours
        ]
        if diffs:
            raise ValueError(
                f"loader state does not match this reader (saved vs now: {'; '.join(diffs)})"
            )
        epoch, next_batch = state.get("epoch"), state.get("next_batch")
        if not (
            _is_int(epoch)
            and _is_int(next_batch)
            and epoch >= 0
            and 0 <= next_batch <= self.batches_per_epoch
        ):
            raise ValueError(
                f"loader state has a bad position: epoch={epoch!r}, next_batch={next_batch!r}"
            )
        return epoch, next_batch

    def __repr__(self) -> str:
        return (
            f"ShardBatches({self.pattern!r}, batch_size={self.batch_size}, train={self.train}, "
            f"seed={self.seed}, replica={self.replica}/{self.replicas}, "
            f"samples={self.num_samples}, batches={self.batches_per_epoch})"
        )


_decoded_here = [0]  # images decoded in this process, by every reader in it
_decoded_lock = threading.Lock()


def _count_decoded() -> None:
    with _decoded_lock:
        _decoded_here[0] += 1


def decoded_in_process() -> int:
    """Images decoded so far in this process, by every reader in it (the driver's stays 0)."""
    with _decoded_lock:
        return _decoded_here[0]


def _manifest_counts(
    paths: list[str], num_classes: int | None
) -> tuple[list[int], list[str]] | None:
    """Each shard's good samples and sha256 from the ``manifest.json`` that ``data.convert``
    wrote beside it, or None: scan instead.

    None, silently, when a folder has no converter manifest (none at all, or another tool's,
    e.g. ``data.demo``'s) or when ``num_classes`` leaves out classes that have samples (the scan
    counts those). None, with a one-line warning, when the manifest does not match the shards:
    a shard it does not list, a size other than the one it records (a shard rewritten since),
    or an unreadable manifest. Only names and sizes are compared: checking the sha256 would
    read every byte.
    """
    records: dict[str, dict] = {}
    for folder in sorted({os.path.dirname(path) for path in paths}):
        file = os.path.join(folder, _MANIFEST)
        try:
            with open(file) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("%s is unreadable (%s); indexing by scanning the shards", file, err)
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
            return None
        try:
            classes_used = [c["index"] for c in manifest["classes"] if c["samples"] > 0]
            for record in manifest["shards"]:
                records[os.path.join(folder, record["shard"])] = {
                    "file": file, "samples": int(record["samples"]), "bytes": int(record["bytes"]),
                    "sha256": str(record["sha256"]),
                }  # fmt: skip
        except (KeyError, TypeError, ValueError) as err:
            log.warning("%s is malformed (%r); indexing by scanning the shards", file, err)
            return None
        if num_classes is not None and any(c >= num_classes for c in classes_used):
            return None
    counts, digests = [], []
    for path in paths:
        record = records.get(path)
        if record is None:
            file = os.path.join(os.path.dirname(path), _MANIFEST)
            log.warning("%s does not list %s; indexing by scanning the shards", file, path)
            return None
        size = os.path.getsize(path)
        if size != record["bytes"]:
            log.warning(
                "%s does not match the shards (%s is %d bytes, the manifest says %d); indexing by "
                "scanning the shards",
                record["file"],
                os.path.basename(path),
                size,
                record["bytes"],
            )
            return None
        counts.append(record["samples"])
        digests.append(record["sha256"])
    return counts, digests


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int) -> None:
    """Raise a one-line ValueError unless ``value`` is an int >= ``minimum``."""
    if not _is_int(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
