"""PCA colour augmentation (both variants' constants), the ten test views, batched normalisation
(torch's two passes, and data._normalize's one on a CPU, to the bit)."""

import os

import numpy as np
import pytest
import torch

import data.normalize
from data.transforms import (MEAN_RGB, PCA_EIGENVECTORS, EvalTransform, TenViewTransform,
                             normalize_batch, pca_lighting_offset)


def test_lighting_offset_is_the_papers_formula():
    # offset = P · (α ∘ λ) · 255 with α ~ N(0, 0.1), drawn from the given generator
    alphas = np.random.default_rng(3).normal(0.0, 0.1, size=3)
    expected = PCA_EIGENVECTORS @ (alphas * np.array([0.2175, 0.0188, 0.0045])) * 255
    np.testing.assert_allclose(pca_lighting_offset(np.random.default_rng(3)), expected, rtol=1e-6)
    code = PCA_EIGENVECTORS @ (alphas * np.array([121.78, 37.09, 19.72]))
    np.testing.assert_allclose(pca_lighting_offset(np.random.default_rng(3), "cuda-convnet-2012"), code, rtol=1e-6)
    with pytest.raises(ValueError, match="lighting variant must be one of paper, cuda-convnet-2012"):
        pca_lighting_offset(np.random.default_rng(0), "imagenet")


def test_lighting_strength_matches_the_constants():
    # along the first eigenvector the shift's std is 0.1 · 0.2175 · 255 ≈ 5.5 (paper), 12.2 (2012 code)
    rng = np.random.default_rng(0)
    for variant, std in (("paper", 0.1 * 0.2175 * 255), ("cuda-convnet-2012", 0.1 * 121.78)):
        shifts = np.stack([pca_lighting_offset(rng, variant) for _ in range(20000)])
        along_first = shifts @ PCA_EIGENVECTORS[:, 0]  # the eigenvectors are orthonormal (to 1e-3)
        assert abs(along_first.std() - std) < 0.05 * std, variant


def test_normalize_adds_each_images_lighting():
    images = torch.full((2, 3, 4, 4), 100, dtype=torch.uint8)
    lighting = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]])
    out = normalize_batch(images, lighting=lighting, memory_format=torch.channels_last)
    for b in range(2):
        for c in range(3):
            assert torch.allclose(out[b, c], torch.full((4, 4), 100 - MEAN_RGB[c] + lighting[b, c].item()))
    assert out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"lighting must be \(2, 3\)"):
        normalize_batch(images, lighting=torch.zeros(3))


def test_the_one_pass_extension_is_built_where_required():
    if os.environ.get("ALEXNET_REQUIRE_JPEGROI") != "1":  # CI sets it: both C extensions must build
        pytest.skip("ALEXNET_REQUIRE_JPEGROI is not set (CI sets it)")
    assert data.normalize._normalize is not None, "data._normalize did not build: apt-get install gcc"


@pytest.mark.skipif(data.normalize._normalize is None, reason="data._normalize is not built")
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 3, 64, 64), (1, 3, 227, 227), (4, 3, 224, 224)])
def test_the_one_pass_normalisation_is_torchs_to_the_bit(shape, monkeypatch):
    # plane sizes that are and are not a multiple of the kernel's 16 pixels and of 32-byte rows;
    # every kernel: AVX2 or plain C, cached or streamed stores, into an aligned or a shifted buffer
    one_pass = data.normalize._normalize
    generator = torch.Generator().manual_seed(sum(shape))
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    for lighting in (None, torch.randn(shape[0], 3, generator=generator) * 20):
        with monkeypatch.context() as torch_only:
            torch_only.setattr(data.normalize, "_normalize", None)
            expected = normalize_batch(images, lighting=lighting)
        for simd in (True, False):
            was = one_pass._set_simd(simd)
            try:
                for stream_bytes in (0, 1 << 60):
                    monkeypatch.setattr(data.normalize, "STREAM_BYTES", stream_bytes)
                    assert torch.equal(normalize_batch(images, lighting=lighting), expected)
                    shifted = torch.empty(images.numel() + 3)[3:].view(shape)  # 12 bytes off alignment
                    assert normalize_batch(images, shifted, lighting=lighting) is shifted
                    assert torch.equal(shifted, expected)
            finally:
                one_pass._set_simd(was)
    with pytest.raises(ValueError, match="not whole planes"):
        one_pass.normalize(bytes(10), bytes(4), bytearray(40), 3, False)
    with pytest.raises(ValueError, match="out has 32 bytes, not 9 float32"):
        one_pass.normalize(bytes(9), bytes(12), bytearray(32), 3, False)


def test_ten_views_are_corners_centre_and_their_flips():
    # a 256×256 gradient image: pixel value encodes its position, so every view is identifiable
    rows, cols = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    image = np.stack([rows, cols, (rows + cols) // 2], axis=-1).astype(np.uint8)
    views = TenViewTransform(256, 224)(image)
    assert views.shape == (10, 3, 224, 224) and views.dtype == np.uint8
    top_left = [(int(v[0, 0, 0]), int(v[1, 0, 0])) for v in views[:5]]
    assert top_left == [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    assert np.array_equal(views[4], EvalTransform(256, 224)(image))  # the centre view
    assert np.array_equal(views[5:], views[:5, ..., ::-1])
