"""data/seeding.py against numpy: a training sample's generator is `default_rng([seed, epoch, index])`
bit for bit, in its state and in what it draws, for seeds of one to four 32-bit words, zeros and
the largest index, and from threads at once; what numpy refuses, or what would need another
word per index, is refused."""

import concurrent.futures

import numpy as np
import pytest

from data.seeding import sample_rng, sample_words

UINT32_MAX = 2**32 - 1


def numpy_words(seed: int, epoch: int, index: int) -> np.ndarray:
    return np.random.SeedSequence([seed, epoch, index]).generate_state(4, np.uint64)


def draws(rng: np.random.Generator) -> tuple:
    # what a training sample takes: integer crop offsets, a flip, three normals (PCA noise)
    return rng.integers(0, 33), rng.integers(0, 33), rng.random(), tuple(rng.normal(0.0, 0.1, 3))


@pytest.mark.parametrize("seed", [0, 1, 7, UINT32_MAX, 2**32, 2**63 + 12345, 2**100 + 3])
def test_the_words_and_the_generator_are_numpys(seed):
    pick = np.random.default_rng(seed % 1000)
    for epoch in (0, 1, 89, int(pick.integers(0, 2**40))):
        indices = np.concatenate([[0, 1, UINT32_MAX], pick.integers(0, UINT32_MAX, 61)])
        words = sample_words(seed, epoch, indices)
        assert words.shape == (64, 4) and words.dtype == np.uint64
        for index, row in zip(indices, words):
            assert np.array_equal(row, numpy_words(seed, epoch, int(index))), (seed, epoch, index)
            reference = np.random.default_rng([seed, epoch, int(index)])
            ours = sample_rng(row)
            assert ours.bit_generator.state == reference.bit_generator.state
            assert draws(ours) == draws(reference)


def test_each_thread_has_its_own_generator():
    words = sample_words(3, 2, np.arange(400))

    def sample(row: int) -> tuple:
        return draws(sample_rng(words[row]))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        ours = list(pool.map(sample, range(400)))
    assert ours == [draws(np.random.default_rng([3, 2, i])) for i in range(400)]


def test_a_negative_seed_or_epoch_and_an_index_beyond_32_bits_are_refused():
    for seed, epoch in ((-1, 0), (0, -2)):
        with pytest.raises(ValueError, match="seed and epoch must be >= 0"):
            sample_words(seed, epoch, np.arange(3))
    with pytest.raises(ValueError, match="indices must be in 0..4294967295"):
        sample_words(0, 0, np.array([2**32]))
    with pytest.raises(ValueError, match="indices must be in"):
        sample_words(0, 0, np.array([-1]))
