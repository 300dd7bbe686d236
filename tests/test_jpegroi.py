"""Tests of the region-of-interest JPEG decoder (data/_jpegroi.c) and of the training views
built on it (TrainTransform.from_jpeg, ShardBatches(train=True)), and of its resize of the
evaluation views (EvalTransform, TenViewTransform).

The claim under test is exactness: a region decoded alone equals the same region of a full
decode bit for bit, so the loader's training batches are the same with and without the
extension. All on real photos (scikit-image's, through data.demo.render_sample), small enough
that the file takes seconds.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import os

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image
from tartools import write_tar

from data import transforms
from data.demo import CLASS_PHOTOS, _load_photo, render_sample
from data.loader import ShardBatches
from data.shards import write_shards
from data.transforms import TrainTransform, decode_region, decode_rgb, region_size

pytestmark = pytest.mark.timeout(120)

_jpegroi = transforms._jpegroi
# CI sets this: there the extension must be built, not skipped (.ci/run).
REQUIRED = os.environ.get("ALEXNET_REQUIRE_JPEGROI") == "1"
needs_roi = pytest.mark.skipif(
    _jpegroi is None and not REQUIRED, reason="data._jpegroi is not built (pip install -e .)"
)

# Every chroma sampling libjpeg-turbo upsamples differently: none (4:4:4), horizontal fancy
# (4:2:2), both (4:2:0), vertical (4:4:0), 4× box (4:1:1); plus grey and progressive.
SAMPLINGS = ["444", "422", "420", "440", "411"]
KINDS = SAMPLINGS + ["gray", "progressive-420", "progressive-444"]


def _photo(index: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A rendered view of demo photo ``index`` (shorter side 300–500), optionally cut to
    ``shape``: (H, W, 3) uint8."""
    photo = _load_photo(list(CLASS_PHOTOS.values())[index % len(CLASS_PHOTOS)])
    pixels = decode_rgb(render_sample(photo, np.random.default_rng([11, index])))
    if shape is not None:
        pixels = pixels[: shape[0], : shape[1]]
    return np.ascontiguousarray(pixels)


def _encode(pixels: np.ndarray, kind: str, quality: int = 92) -> bytes:
    """``pixels`` as a JPEG of ``kind`` (see KINDS)."""
    if kind in SAMPLINGS:
        return simplejpeg.encode_jpeg(pixels, quality=quality, colorsubsampling=kind)
    if kind == "gray":
        return simplejpeg.encode_jpeg(pixels[..., :1].copy(), quality=quality, colorspace="GRAY")
    buffer = io.BytesIO()
    subsampling = 2 if kind == "progressive-420" else 0  # PIL: 2 = 4:2:0, 0 = 4:4:4
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality, progressive=True,
                                 subsampling=subsampling)  # fmt: skip
    return buffer.getvalue()


def _region(jpg: bytes, top: int, left: int, height: int, width: int) -> np.ndarray:
    pixels, x, stride = _jpegroi.decode_region(jpg, top, left, height, width)
    assert x <= left and x + stride >= left + width and len(pixels) == height * stride * 3
    decoded = np.frombuffer(pixels, np.uint8).reshape(height, stride, 3)
    return decoded[:, left - x : left - x + width]


def _edges(size: int) -> list[int]:
    """Starts worth testing along a side of ``size``: the image edges and both sides of the
    iMCU boundaries at 8, 16 and 32 pixels."""
    near = {0, 1, 2, 3, 7, 8, 9, 14, 15, 16, 17, 18, 31, 32, 33, size // 2}
    near |= {size - 3, size - 2, size - 1}
    return sorted(p for p in near if 0 <= p < size)


# ---------------------------------------------------------------- the extension


def test_the_extension_is_built_where_required() -> None:
    if not REQUIRED:
        pytest.skip("ALEXNET_REQUIRE_JPEGROI is not set (CI sets it)")
    assert _jpegroi is not None, "data._jpegroi did not build: apt-get install gcc libjpeg-dev"


@needs_roi
@pytest.mark.parametrize("kind", KINDS)
def test_a_region_equals_the_full_decode_bit_for_bit(kind: str) -> None:
    # An odd size (not a multiple of any iMCU) so the right and bottom edges are partial blocks.
    jpg = _encode(_photo(KINDS.index(kind), (101, 133)), kind)
    full = simplejpeg.decode_jpeg(jpg, colorspace="RGB")  # what decode_rgb returns
    assert np.array_equal(decode_rgb(jpg), full)
    height, width = full.shape[:2]
    assert _jpegroi.read_header(jpg)[:2] == (height, width)
    assert np.array_equal(_region(jpg, 0, 0, height, width), full)  # the system libjpeg agrees
    checked = 0
    for top in _edges(height):
        for h in {min(n, height - top) for n in (1, 3, height)}:  # 1 row, 3, to the bottom
            for left in _edges(width):
                for w in {min(n, width - left) for n in (1, 2, 5, width)}:  # 1 column (the
                    # hardest for the upsampler), 2, 5, to the right edge
                    got = _region(jpg, top, left, h, w)
                    want = full[top : top + h, left : left + w]
                    assert np.array_equal(got, want), (kind, top, left, h, w)
                    checked += 1
    assert checked > 2000


@needs_roi
def test_header_and_colour_spaces() -> None:
    rgb = _photo(0, (40, 56))
    assert _jpegroi.read_header(_encode(rgb, "420")) == (40, 56, "YCbCr", False)
    assert _jpegroi.read_header(_encode(rgb, "gray")) == (40, 56, "Gray", False)
    assert _jpegroi.read_header(_encode(rgb, "progressive-420")) == (40, 56, "YCbCr", True)
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    assert _jpegroi.read_header(cmyk.getvalue())[2] == "CMYK"
    with pytest.raises(ValueError, match="CMYK"):  # left to decode_rgb (PIL)
        _jpegroi.decode_region(cmyk.getvalue(), 0, 0, 8, 8)
    assert region_size(cmyk.getvalue()) is None


@needs_roi
@pytest.mark.parametrize(
    "args, words",
    [
        ((0, 0, 41, 8), "not inside the 40x56 image"),  # one row too many
        ((0, 50, 8, 7), "not inside"),  # one column too many
        ((-1, 0, 8, 8), "top must be >= 0"),
        ((0, -1, 8, 8), "left must be >= 0"),
        ((0, 0, 0, 8), "height must be >= 1"),
        ((0, 0, 8, 0), "width must be >= 1"),
    ],
)
def test_a_region_outside_the_image_is_refused(args: tuple, words: str) -> None:
    jpg = _encode(_photo(1, (40, 56)), "420")
    with pytest.raises(ValueError, match=words):
        _jpegroi.decode_region(jpg, *args)


@needs_roi
def test_bad_data_raises_value_error_and_never_crashes() -> None:
    jpg = _encode(_photo(2, (64, 80)), "420")
    not_jpegs = [b"", b"\xff\xd8", b"\x00garbage" * 50, b"\xff\xd8\xff not really a jpeg"]
    for data in not_jpegs:
        with pytest.raises(ValueError):
            _jpegroi.decode_region(data, 0, 0, 1, 1)
        with pytest.raises(ValueError):
            _jpegroi.read_header(data)
    # Truncated anywhere: libjpeg's "Premature end of JPEG file" (a warning) is an error here.
    for cut in range(len(jpg) // 10, len(jpg) - 1, len(jpg) // 10):
        with pytest.raises(ValueError, match="cannot decode JPEG region"):
            _jpegroi.decode_region(jpg[:cut], 0, 0, 64, 80)
    # Random damage to the entropy-coded data: each try decodes or raises ValueError.
    rng = np.random.default_rng(0)
    raised = 0
    for _ in range(300):
        damaged = bytearray(jpg)
        at = rng.integers(len(jpg) // 3, len(jpg) - 2, size=rng.integers(1, 8))
        for i in at:
            damaged[i] = int(rng.integers(256))
        try:
            _jpegroi.decode_region(bytes(damaged), 8, 8, 48, 60)
        except ValueError:
            raised += 1
    assert raised > 0


@needs_roi
def test_threads_decode_at_once() -> None:
    # The decoder releases the GIL and keeps no global state: threads get the same pixels.
    jpgs = [_encode(_photo(i, (120, 150)), "420") for i in range(4)]
    want = [simplejpeg.decode_jpeg(j, colorspace="RGB")[10:110, 20:140] for j in jpgs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda j: _region(j, 10, 20, 100, 120), jpgs * 8))
    assert all(np.array_equal(g, want[i % 4]) for i, g in enumerate(got))
    # and whole training views (decode, resize, write) from the same bytes
    transform = TrainTransform(128, 96)
    views = [transform.from_jpeg(j, np.random.default_rng(i)) for i, j in enumerate(jpgs)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(
            lambda i: transform.from_jpeg(jpgs[i % 4], np.random.default_rng(i % 4)), range(32)))
    assert all(np.array_equal(g, views[i % 4]) for i, g in enumerate(got))


# ---------------------------------------------------------------- the resize


def _ramps(height: int, width: int) -> np.ndarray:
    """R runs down the rows, G along the columns, B along the diagonal, a few levels per pixel:
    any shift of the sampling grid or other rounding shows."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows * 3, cols * 5, (rows + cols) * 2], axis=-1).astype(np.uint8)  # wraps


def _resampled(image: np.ndarray, plan, crop: int, flip: bool) -> np.ndarray:
    out = np.empty((3, crop, crop), np.uint8)
    (r0, r1), (c0, c1) = plan.rows, plan.cols
    _jpegroi.resample(image, image.strides[0], r0, c0, r1 - r0, c1 - c0, plan.scale_factor,
                      plan.dy, plan.dx, crop, flip, out)
    return out


@needs_roi
@pytest.mark.parametrize("simd", [True, False], ids=["simd", "plain-c"])
def test_resample_is_torchs_antialiased_resize_bit_for_bit(simd: bool) -> None:
    # data/_jpegroi.c does the integer sums of torch's uint8 kernel (F.interpolate(...,
    # antialias=True)) with the same int16 weights, so no pixel differs (the issue allows one
    # grey level). Shorter sides around 256 (at 255 and 257 an axis of the window can keep its
    # size, and torch then copies it), ImageNet's usual 300-500, large downscales, upscales, odd
    # crops (the kernels' tails); real photos and ramps.
    was = _jpegroi._set_simd(simd)
    try:
        shapes = [(255, 300), (256, 301), (257, 257), (375, 500), (500, 333), (427, 640),
                  (1200, 1600), (200, 250), (31, 45)]
        for n, (height, width) in enumerate(shapes):
            photo = np.array(Image.fromarray(_photo(n)).resize((width, height), Image.BILINEAR))
            for image in (photo, _ramps(height, width)):
                for transform in (TrainTransform(), TrainTransform(256, 227)):
                    for seed in range(4):
                        top, left, flip = transform._draw(np.random.default_rng(seed))
                        plan = transform._plan(height, width, top, left)
                        (r0, r1), (c0, c1) = plan.rows, plan.cols
                        want = transform._torch_view(image[r0:r1, c0:c1], plan, flip, None)
                        got = _resampled(image, plan, transform.crop, flip)
                        assert np.array_equal(got, want), (simd, height, width, seed)
        # any window, scale factor and patch, not only the training views'
        rng = np.random.default_rng(1)
        image = _ramps(300, 420)
        for _ in range(120):
            h, w = int(rng.integers(1, 301)), int(rng.integers(1, 421))
            top, left = int(rng.integers(0, 301 - h)), int(rng.integers(0, 421 - w))
            scale_factor = 256 / int(rng.integers(60, 3000))
            out_h, out_w = int(h * scale_factor), int(w * scale_factor)  # torch's output size
            crop = min(out_h, out_w, int(rng.integers(1, 230)))
            if crop < 1:
                continue
            dy, dx = int(rng.integers(0, out_h - crop + 1)), int(rng.integers(0, out_w - crop + 1))
            flip = bool(rng.random() < 0.5)
            pixels = torch.from_numpy(image[top : top + h, left : left + w]).permute(2, 0, 1)[None]
            resized = torch.nn.functional.interpolate(
                pixels, scale_factor=scale_factor, mode="bilinear", antialias=True,
                align_corners=False, recompute_scale_factor=False)[0]  # fmt: skip
            want = resized[:, dy : dy + crop, dx : dx + crop]
            want = want.flip(-1) if flip else want
            out = np.empty((3, crop, crop), np.uint8)
            _jpegroi.resample(image, image.strides[0], top, left, h, w, scale_factor, dy, dx,
                              crop, flip, out)
            assert np.array_equal(out, want.numpy()), (h, w, top, left, scale_factor, crop, dy, dx)
    finally:
        _jpegroi._set_simd(was)


@needs_roi
@pytest.mark.parametrize(
    "change, words",
    [
        ({"out": np.empty((3, 8, 9), np.uint8)}, "out must hold 3 x 8 x 8 bytes"),
        ({"dy": 13}, r"patch rows 13..21, columns 0..8 is not inside the 20x25 resized window"),
        ({"top": 1}, "window rows 1..41, columns 0..50 is not inside the 6000 bytes"),
        ({"scale_factor": 0.0}, "scale_factor must be > 0"),
        ({"crop": 0}, "crop must be >= 1"),
    ],
)
def test_resample_checks_its_arguments(change: dict, words: str) -> None:
    image = np.zeros((40, 50, 3), np.uint8)
    args = dict(pixels=image, stride=150, top=0, left=0, height=40, width=50, scale_factor=0.5,
                dy=0, dx=0, crop=8, flip=False, out=np.empty((3, 8, 8), np.uint8))
    _jpegroi.resample(**args)  # the 20x25 resize holds the 8x8 patch
    with pytest.raises(ValueError, match=words):
        _jpegroi.resample(**{**args, **change})
    with pytest.raises(TypeError):  # out must be writable
        _jpegroi.resample(**{**args, "out": bytes(192)})


@needs_roi
@pytest.mark.parametrize("simd", [True, False])
def test_resize_is_torchs_resize_to_a_size_bit_for_bit(simd: bool) -> None:
    # The evaluation views' resize (_jpegroi.resize): a square to size x size, as
    # F.interpolate(..., size=...) computes it (scale = in / out, which 1 / scale_factor is not
    # always, to the last bit), down and up, on photos and ramps, at patches in every corner.
    was = _jpegroi._set_simd(simd)
    try:
        rng = np.random.default_rng(2)
        for n in range(60):
            side, size = int(rng.integers(1, 520)), int(rng.integers(1, 300))
            crop = int(rng.integers(1, size + 1))
            image = _ramps(side, side + 7) if n % 2 else np.array(
                Image.fromarray(_photo(n)).resize((side + 7, side), Image.BILINEAR))
            pixels = torch.from_numpy(image[:, 3 : 3 + side]).permute(2, 0, 1)[None]  # the square
            resized = pixels[0] if side == size else torch.nn.functional.interpolate(
                pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
            for dy, dx in [(0, 0), (0, size - crop), (size - crop, 0), (size - crop, size - crop),
                           ((size - crop) // 2, (size - crop) // 2)]:
                out = np.empty((3, crop, crop), np.uint8)
                _jpegroi.resize(image, image.strides[0], 0, 3, side, side, size, size, dy, dx, crop, False, out)
                assert np.array_equal(out, resized[:, dy : dy + crop, dx : dx + crop].numpy()), (
                    simd, side, size, crop, dy, dx)
    finally:
        _jpegroi._set_simd(was)


def test_evaluation_views_are_the_same_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    # the centre view and the ten views, resized by the extension or by torch (_square)
    shapes = [(375, 500), (500, 333), (256, 300), (200, 240), (64, 90)]
    images = [np.array(Image.fromarray(_photo(n)).resize((w, h), Image.BILINEAR)) for n, (h, w) in enumerate(shapes)]
    made = [[transforms.view_transform(resize, crop, views)(image) for image in images]
            for resize, crop, views in [(256, 224, 1), (256, 224, 10), (72, 64, 1), (72, 64, 10)]]
    monkeypatch.setattr(transforms, "_jpegroi", None)
    again = [[transforms.view_transform(resize, crop, views)(image) for image in images]
             for resize, crop, views in [(256, 224, 1), (256, 224, 10), (72, 64, 1), (72, 64, 10)]]
    for ours, theirs in zip(made, again):
        assert all(a.flags.c_contiguous and np.array_equal(a, b) for a, b in zip(ours, theirs))


# ---------------------------------------------------------------- training views


def _same_view(transform: TrainTransform, jpg: bytes, seed: int) -> None:
    """from_jpeg(jpg) equals the array path on decode_rgb(jpg), and draws the same."""
    a, b = np.random.default_rng(seed), np.random.default_rng(seed)
    out = np.empty((3, transform.crop, transform.crop), dtype=np.uint8)
    got = transform.from_jpeg(jpg, a, out=out)
    assert got is out
    assert np.array_equal(got, transform(decode_rgb(jpg), b)), seed
    assert a.random() == b.random()  # the lighting draw that follows is the same


@pytest.mark.parametrize("kind", KINDS)
def test_from_jpeg_gives_the_array_paths_view(kind: str) -> None:
    # Shorter sides 300–500 (downscale), exactly 256 (a plain crop) and 200 (upscale).
    transform = TrainTransform()
    for n, shape in enumerate([None, (256, 301), (340, 256), (200, 250)]):
        jpg = _encode(_photo(n + KINDS.index(kind), shape), kind)
        for seed in range(4):
            _same_view(transform, jpg, seed)


def test_from_jpeg_falls_back_for_other_files() -> None:
    # CMYK JPEGs, PNGs behind a .jpg name, truncated files go through decode_rgb as before.
    rgb = _photo(3, (300, 360))
    transform = TrainTransform()
    for mode, fmt in [("CMYK", "JPEG"), ("RGB", "PNG")]:
        buffer = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buffer, fmt)
        assert region_size(buffer.getvalue()) is None
        _same_view(transform, buffer.getvalue(), 0)
    jpg = _encode(rgb, "420")
    assert region_size(jpg[:-2]) is None  # no EOI marker: maybe cut short, so not decoded in part
    with pytest.raises(ValueError):  # a truncated file is undecodable, as before
        transform.from_jpeg(jpg[: len(jpg) // 2], np.random.default_rng(0))
    with pytest.raises(ValueError):
        transform.from_jpeg(b"\x00garbage" * 50, np.random.default_rng(0))


@needs_roi
def test_decode_region_returns_a_view_of_the_window() -> None:
    jpg = _encode(_photo(4, (300, 360)), "420")
    window = decode_region(jpg, (30, 250), (45, 290))
    assert window.shape == (220, 245, 3) and window.dtype == np.uint8
    assert np.array_equal(window, decode_rgb(jpg)[30:250, 45:290])
    cut = jpg[: len(jpg) // 2] + b"\xff\xd9"  # cut short, with an end marker: libjpeg warns
    assert region_size(cut) == (300, 360) and decode_region(cut, (30, 250), (45, 290)) is None


def test_without_the_extension_one_warning_and_the_same_views(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    jpg = _encode(_photo(5), "420")
    want = TrainTransform().from_jpeg(jpg, np.random.default_rng(3))
    monkeypatch.setattr(transforms, "_jpegroi", None)
    transforms._warn_no_region_decoder.cache_clear()
    with caplog.at_level(logging.WARNING, logger="data.transforms"):
        views = [TrainTransform().from_jpeg(jpg, np.random.default_rng(3)) for _ in range(3)]
    assert all(np.array_equal(v, want) for v in views)
    assert caplog.text.count("data._jpegroi is not built") == 1


# ---------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two shards of 24 real photos at full size (every kind of JPEG, a CMYK JPEG, a PNG),
    then a tar with a truncated JPEG and garbage: the bad samples the loader substitutes."""
    folder = tmp_path_factory.mktemp("mixed")
    samples = []
    for i in range(24):
        kind = KINDS[i % len(KINDS)]
        pixels = _photo(i)
        if i == 5:
            buffer = io.BytesIO()
            Image.fromarray(pixels).convert("CMYK").save(buffer, "JPEG", quality=90)
            jpg = buffer.getvalue()
        elif i == 11:
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "PNG")
            jpg = buffer.getvalue()
        else:
            jpg = _encode(pixels, kind, quality=90)
        samples.append((f"s{i:03d}", jpg, i % 10))
    write_shards(samples, str(folder), "a", 12)
    cut = samples[0][1]
    write_tar(folder / "b.tar", [
        ("t.cls", b"1"), ("t.jpg", cut[: len(cut) * 2 // 3]),  # truncated: undecodable
        ("u.cls", b"2"), ("u.jpg", b"\x00garbage" * 50),       # not an image
        ("v.cls", b"3"), ("v.jpg", samples[1][1]),             # fine
    ])  # fmt: skip
    return str(folder)


def _epochs(pattern: str, threads: int) -> tuple[list, dict]:
    reader = ShardBatches(pattern, 6, train=True, seed=3, max_bad_fraction=0.5, num_threads=threads)
    batches = [b for epoch in range(3) for b in reader.epoch_batches(epoch)]
    return batches, dict(reader.read_stats.reasons)


@needs_roi
@pytest.mark.parametrize("threads", [1, 2])
def test_loader_batches_are_identical_without_the_extension(
    mixed_shards: str, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    with_roi, bad = _epochs(mixed_shards, threads)
    # 27 samples, batches of 6: 4 per epoch; both bad samples turn up in 3 epochs of 24 rows.
    assert len(with_roi) == 12 and bad == {"undecodable image": 2}
    monkeypatch.setattr(transforms, "_jpegroi", None)
    without, bad_without = _epochs(mixed_shards, threads)
    assert bad_without == bad
    for a, b in zip(with_roi, without, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.lighting, b.lighting)


@needs_roi
def test_loader_decodes_only_the_window(mixed_shards: str, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []
    decode_view = transforms._decode_view

    def spy(jpg: bytes, plan, crop: int, flip: bool, out: np.ndarray) -> bool:
        asked.append((plan.rows, plan.cols, region_size(jpg)))
        assert decode_view(jpg, plan, crop, flip, out)  # decoded in part, not by decode_rgb
        return True

    monkeypatch.setattr(transforms, "_decode_view", spy)
    reader = ShardBatches(mixed_shards, 6, train=True, seed=3, max_bad_fraction=0.5)
    next(reader.epoch_batches(0))
    assert len(asked) >= 4  # 6 rows; a CMYK or PNG sample is decoded whole
    for (r0, r1), (c0, c1), (height, width) in asked:
        side = min(height, width)
        # the window of a 224 crop of the 256 square: 224/256 of the side plus the filter margin
        assert r1 - r0 < 0.9 * side + 8 and c1 - c0 < 0.9 * side + 8
        assert r1 <= height and c1 <= width
