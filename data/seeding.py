"""``np.random.default_rng([seed, epoch, index])`` for every sample of a batch at once, bit for bit.

A training sample's crop, flip and colour noise come from its own generator,
``default_rng([seed, epoch, index])`` (data/loader.py), so that a batch is a pure function of
its position whatever the replica or loader that makes it. numpy builds that generator in
~16 µs (a SeedSequence hashes the three numbers, PCG64 seeds itself from four words of it),
4% of a pre-resized image's whole decode on one core. Here the SeedSequence hash runs on a
whole batch's indices as uint32 arrays (the same arithmetic, one numpy operation per step
for all rows), the PCG64 seeding on Python integers, and each thread reuses one generator whose
state is set per sample: ~3.5 µs a sample. tests/test_seeding.py checks the states and the draws
against numpy's own on thousands of inputs.

The arithmetic is numpy's (numpy/random/bit_generator.pyx, ``SeedSequence``; pcg64.c,
``pcg64_set_seed``); numpy documents the SeedSequence algorithm as stable across versions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

__all__ = ["sample_rng", "sample_words"]

# SeedSequence's hash constants, pool of four 32-bit words, and the shift of its mixer
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_POOL = 4
_SHIFT = np.uint32(16)
_M32, _M128 = (1 << 32) - 1, (1 << 128) - 1
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645  # PCG64's 128-bit LCG multiplier

_local = threading.local()


def _words(value: int) -> list[int]:
    """A non-negative int as SeedSequence reads it: 32-bit words, least significant first (0: [0])."""
    if value < 0:
        raise ValueError(f"seed and epoch must be >= 0 (as for SeedSequence), got {value}")
    words = [value & _M32]
    value >>= 32
    while value:
        words.append(value & _M32)
        value >>= 32
    return words


def _hasher(init: int, mult: int) -> Callable[[np.ndarray], np.ndarray]:
    """SeedSequence's hash of 32-bit words, whose constant starts at ``init`` and is multiplied
    by ``mult`` at every call (one hasher for mixing the entropy in, another for the output)."""
    const = init

    def hash_words(value: np.ndarray) -> np.ndarray:
        nonlocal const
        value = value ^ np.uint32(const)
        const = (const * mult) & _M32
        value = value * np.uint32(const)
        return value ^ (value >> _SHIFT)

    return hash_words


def sample_words(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """(n, 4) uint64: ``SeedSequence([seed, epoch, i]).generate_state(4, np.uint64)`` for each
    ``i`` of ``indices`` (ints >= 0), computed for all of them together."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() > _M32):
        raise ValueError(f"indices must be in 0..{_M32}, got {indices.min()}..{indices.max()}")
    n = indices.size
    entropy = [np.full(n, word, np.uint32) for word in _words(seed) + _words(epoch)]
    entropy.append(indices.astype(np.uint32))
    hashmix = _hasher(_INIT_A, _MULT_A)

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
        return result ^ (result >> _SHIFT)

    zeros = np.zeros(n, np.uint32)
    pool = [hashmix(entropy[i] if i < len(entropy) else zeros) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL, len(entropy)):  # a seed of two or more words
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(entropy[src]))
    output = _hasher(_INIT_B, _MULT_B)  # generate_state: eight 32-bit words, read in pairs as four uint64
    state = [output(pool[i % _POOL]) for i in range(2 * 4)]
    words = np.stack(state, axis=1).astype(np.uint64)  # (n, 8)
    return words[:, 0::2] | (words[:, 1::2] << np.uint64(32))


def sample_rng(words: np.ndarray) -> np.random.Generator:
    """This thread's generator, in the state of ``np.random.PCG64(seed_sequence)`` whose
    ``generate_state(4, np.uint64)`` is ``words`` (a row of :func:`sample_words`). It is
    reset by this thread's next call: draw what a sample needs before asking for the next."""
    generator = getattr(_local, "generator", None)
    if generator is None:
        generator = _local.generator = np.random.Generator(np.random.PCG64(0))
    w0, w1, w2, w3 = (int(w) for w in words)
    inc = ((((w2 << 64) | w3) << 1) | 1) & _M128
    state = ((inc + ((w0 << 64) | w1)) * _PCG_MULT + inc) & _M128  # pcg64_set_seed: step, add, step
    generator.bit_generator.state = {
        "bit_generator": "PCG64", "state": {"state": state, "inc": inc}, "has_uint32": 0, "uinteger": 0,
    }
    return generator
