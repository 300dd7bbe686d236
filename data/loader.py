"""A small deterministic batch iterator over WebDataset shards.

Every batch is a pure function of ``(seed, epoch)`` and the shards: the training order is a
permutation drawn from ``(seed, epoch)``, and the augmentation of sample ``index`` (its position
in shard order) draws from ``numpy.random.default_rng([seed, epoch, index])``. So the images do
not depend on the batch size, the thread count or which process builds them.

It holds every sample's encoded bytes in memory (about 56 KB per demo image, so ~85 MB for the
default demo dataset): fine for the demo, not meant for ImageNet.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from data.shards import ReadStats, expand_shards, read_samples
from data.transforms import EvalTransform, TrainTransform, decode_rgb

__all__ = ["ShardBatches"]

log = logging.getLogger(__name__)

_ORDER_STREAM = (1,)  # spawn key that keeps the order stream apart from the per-sample streams


class ShardBatches:
    """Batches of ``(images, labels)`` from the shards named by ``pattern``.

    ``images`` is a (B, 3, crop, crop) uint8 tensor, ``labels`` a (B,) int64 tensor. Training
    batches are shuffled and augmented (:class:`TrainTransform`); evaluation batches come in
    shard order, centre-cropped (:class:`EvalTransform`).

    Pickling keeps only the settings: a copy reads the shards again on first use.
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
        drop_last: bool | None = None,
        num_threads: int = 1,
    ) -> None:
        """
        Args:
            pattern: Shard pattern, see :func:`data.shards.expand_shards`.
            batch_size: Samples per batch.
            train: Shuffle and augment (True) or keep order and centre-crop (False).
            seed: Seed of the order and of every augmentation draw; an int >= 0.
            resize: Side of the square the shorter side is rescaled and centre-cropped to.
            crop: Side of the crop the network sees.
            drop_last: Drop the last partial batch. Default: True when training (every batch
                full), False for evaluation (every sample scored).
            num_threads: Threads that decode and transform a batch (1: the calling thread).
        """
        if batch_size < 1 or num_threads < 1 or seed < 0:
            raise ValueError(
                f"need batch_size >= 1, num_threads >= 1 and seed >= 0; "
                f"got batch_size={batch_size}, num_threads={num_threads}, seed={seed}"
            )
        self.pattern, self.batch_size, self.train, self.seed = pattern, batch_size, train, seed
        self.drop_last = train if drop_last is None else drop_last
        self.num_threads = num_threads
        self._train_view = TrainTransform(resize, crop)
        self._eval_view = EvalTransform(resize, crop)
        self.crop = crop
        self._load()
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.num_samples} samples in {pattern!r} make no full batch of {batch_size}; "
                f"lower batch_size or pass drop_last=False"
            )

    # ------------------------------------------------------------ loading

    def _load(self) -> None:
        """Read every sample's key, encoded bytes and label into memory."""
        self.read_stats = ReadStats()
        samples = list(read_samples(expand_shards(self.pattern), self.read_stats))
        if not samples:
            raise ValueError(f"shard pattern {self.pattern!r} holds no readable samples")
        if self.read_stats.skipped:
            log.warning("%s: skipped %d bad samples", self.pattern, self.read_stats.skipped)
        self._keys = [key for key, _, _ in samples]
        self._jpgs = [jpg for _, jpg, _ in samples]
        self._labels = torch.tensor([cls for _, _, cls in samples], dtype=torch.int64)  # (N,)

    def _ensure_loaded(self) -> None:
        if self._jpgs is None:
            self._load()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_keys=None, _jpgs=None, _labels=None)
        return state

    # ------------------------------------------------------------ sizes

    @property
    def num_samples(self) -> int:
        """Readable samples in the shards."""
        self._ensure_loaded()
        return len(self._jpgs)

    @property
    def batches_per_epoch(self) -> int:
        """Batches that :meth:`epoch_batches` yields."""
        whole, rest = divmod(self.num_samples, self.batch_size)
        return whole + (1 if rest and not self.drop_last else 0)

    # ------------------------------------------------------------ batches

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices in the order epoch ``epoch`` visits them: (N,) int64."""
        self._ensure_loaded()
        if not self.train:
            return np.arange(self.num_samples)
        entropy = np.random.SeedSequence([self.seed, epoch], spawn_key=_ORDER_STREAM)
        return np.random.default_rng(entropy).permutation(self.num_samples)

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images (B, 3, crop, crop) uint8, labels (B,) int64)`` for epoch ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        order = self.epoch_order(epoch)
        with self._mapper() as map_fn:
            for start in range(0, self.batches_per_epoch * self.batch_size, self.batch_size):
                indices = order[start : start + self.batch_size]  # (B,)
                images = torch.empty((len(indices), 3, self.crop, self.crop), dtype=torch.uint8)
                for row, view in enumerate(map_fn(lambda i: self._view(int(i), epoch), indices)):
                    images[row] = view  # (3, crop, crop)
                yield images, self._labels[torch.from_numpy(indices)]

    def _view(self, index: int, epoch: int) -> torch.Tensor:
        """Decode sample ``index`` and make its (3, crop, crop) uint8 view for ``epoch``."""
        try:
            image = decode_rgb(self._jpgs[index])  # (H, W, 3)
        except ValueError as err:
            raise ValueError(f"sample {self._keys[index]!r} in {self.pattern!r}: {err}") from err
        if not self.train:
            return self._eval_view(image)
        return self._train_view(image, np.random.default_rng([self.seed, epoch, index]))

    @contextlib.contextmanager
    def _mapper(self) -> Iterator[Callable[[Callable, Iterable], Iterable]]:
        """An order-keeping ``map``: the built-in one, or a thread pool's."""
        if self.num_threads == 1:
            yield map
            return
        with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
            yield pool.map

    def __repr__(self) -> str:
        return (
            f"ShardBatches({self.pattern!r}, batch_size={self.batch_size}, train={self.train}, "
            f"seed={self.seed}, samples={self.num_samples}, batches={self.batches_per_epoch})"
        )
