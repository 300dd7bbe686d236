"""Tests of data/: shards, the demo dataset, the paper's transforms and the batch iterator.

All on CPU with tiny generated datasets; the whole file takes seconds.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from tartools import write_tar
import simplejpeg
import torch
from PIL import Image

from data import demo as demo_module
from data.demo import DemoDataset, ensure_demo_dataset
from data.loader import ShardBatches
from data.shards import ReadStats, expand_shards, read_samples, write_shards
from data.transforms import MEAN_RGB, EvalTransform, TrainTransform, decode_rgb, normalize_batch

REPO = Path(__file__).resolve().parents[1]

# The tiny demo: 10 classes × 4 train / × 2 val images = 40 / 20 samples, 16 per shard,
# so train has shards of 16 + 16 + 8 and val of 16 + 4.
TINY = dict(train_per_class=4, val_per_class=2, samples_per_shard=16)


def _jpeg(value: int, shape: tuple[int, int] = (24, 32)) -> bytes:
    """A small, valid JPEG of one grey level."""
    return simplejpeg.encode_jpeg(np.full((*shape, 3), value, dtype=np.uint8), quality=90)


def _all_samples(pattern: str) -> list[tuple[str, bytes, int]]:
    return list(read_samples(expand_shards(pattern)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo"), seed=0, **TINY)


# ---------------------------------------------------------------- shards


def test_shard_round_trip(tmp_path: Path) -> None:
    samples = [(f"img_{i:03d}", _jpeg(20 * i), i % 3) for i in range(7)]
    paths = write_shards(samples, str(tmp_path), "train", samples_per_shard=3)
    # 7 samples at 3 per shard: shards of 3 + 3 + 1.
    assert [os.path.basename(p) for p in paths] == [f"train-00000{i}.tar" for i in range(3)]
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(p) for p in paths]  # no temp files
    stats = ReadStats()
    assert list(read_samples(paths, stats)) == samples
    assert (stats.samples, stats.skipped) == (7, 0)
    # Fixed member times: the same samples give byte-identical shards.
    again = write_shards(samples, str(tmp_path / "again"), "train", samples_per_shard=3)
    assert [Path(p).read_bytes() for p in again] == [Path(p).read_bytes() for p in paths]


@pytest.mark.parametrize("key", ["", "a.b", "dir/a"])
def test_write_shards_rejects_bad_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="key"):
        write_shards([(key, _jpeg(0), 0)], str(tmp_path), "x", 10)


def test_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    good = _jpeg(100)
    bad = write_tar(tmp_path / "bad.tar", [
        ("a.cls", b"1"), ("a.jpg", good),                    # fine
        ("b.cls", b"2"), ("b.jpg", b"\x00garbage" * 50),     # not an image
        ("c.cls", b"3"), ("c.jpg", good[: len(good) // 2]),  # truncated JPEG
        ("d.jpg", good),                                     # no cls
        ("e.cls", b"5"),                                     # no jpg
        ("f.cls", b"cat"), ("f.jpg", good),                  # label not an integer
        ("g.cls", b"7"), ("g.jpg", good),                    # fine
    ])  # fmt: skip
    cut = tmp_path / "cut.tar"  # bad.tar cut short inside b's first header, after sample a
    cut.write_bytes(Path(bad).read_bytes()[:3000])
    whole = write_tar(tmp_path / "whole.tar", [("h.cls", b"8"), ("h.jpg", good)])
    stats = ReadStats()
    got = list(read_samples([bad, str(cut), whole], stats))
    assert [(k, c) for k, _, c in got] == [("a", 1), ("g", 7), ("a", 1), ("h", 8)]
    assert all(jpg == good for _, jpg, _ in got)
    # b, c, d, e, f in bad.tar, and the broken rest of cut.tar: 6 skips.
    assert (stats.samples, stats.skipped) == (4, 6)
    assert stats.reasons["missing cls"] == 1 and stats.reasons["missing jpg"] == 1


def test_expand_shards_forms(tmp_path: Path) -> None:
    paths = write_shards([(f"k{i}", _jpeg(i), 0) for i in range(4)], str(tmp_path), "s", 1)
    d = str(tmp_path)
    forms = [
        f"{d}/s-{{000000..000003}}.tar",
        f"{d}/s-*.tar",
        d,
        f"{d}/s-000003.tar,{d}/s-{{000000..000002}}.tar",
        f"{d}/s-00000{{0,1}}.tar, {d}/s-00000{{2,3}}.tar",
    ]
    for form in forms:
        assert expand_shards(form) == paths, form


@pytest.mark.parametrize(
    "pattern",
    ["{d}/nothing-*.tar", "{d}/s-{{000000..000009}}.tar", "{d}/missing.tar", "{d}/empty_dir", ""],
)
def test_expand_shards_errors(tmp_path: Path, pattern: str) -> None:
    write_shards([("k", _jpeg(0), 0)], str(tmp_path), "s", 1)
    (tmp_path / "empty_dir").mkdir()
    pattern = pattern.format(d=tmp_path)
    with pytest.raises(ValueError) as err:
        expand_shards(pattern)
    assert repr(pattern) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- demo dataset


def test_demo_contents(demo: DemoDataset) -> None:
    assert len(demo.class_names) == 10 and (demo.num_train, demo.num_val) == (40, 20)
    train, val = _all_samples(demo.train_pattern), _all_samples(demo.val_pattern)
    assert len(expand_shards(demo.train_pattern)) == 3  # 16 + 16 + 8
    assert (len(train), len(val)) == (40, 20)
    assert np.bincount([c for _, _, c in train]).tolist() == [4] * 10
    assert np.bincount([c for _, _, c in val]).tolist() == [2] * 10
    labels = [c for _, _, c in train]
    assert labels != sorted(labels)  # shuffled across classes
    assert not {j for _, j, _ in train} & {j for _, j, _ in val}
    for _, jpg, _ in train[:5]:
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpg)
        assert 300 <= min(height, width) <= 500


def test_demo_is_deterministic_and_idempotent(demo: DemoDataset, tmp_path: Path) -> None:
    assert ensure_demo_dataset(Path(demo.root).parent, seed=0, **TINY) == demo  # cached
    same = ensure_demo_dataset(tmp_path / "a", seed=0, **TINY)
    other = ensure_demo_dataset(tmp_path / "b", seed=1, **TINY)
    for split in ("train_pattern", "val_pattern"):
        ours, theirs = expand_shards(getattr(demo, split)), expand_shards(getattr(same, split))
        assert [Path(p).read_bytes() for p in ours] == [Path(p).read_bytes() for p in theirs]
    assert not {j for _, j, _ in _all_samples(demo.train_pattern)} & {
        j for _, j, _ in _all_samples(other.train_pattern)
    }
    # A damaged cache is refused, not silently used.
    shard = Path(expand_shards(same.val_pattern)[-1])
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match="damaged"):
        ensure_demo_dataset(tmp_path / "a", seed=0, **TINY)


def test_demo_race_loser_uses_winner(demo: DemoDataset) -> None:
    # Re-run the publish step for a folder that exists: our rename loses, the winner stays.
    before = {p: Path(p).read_bytes() for p in expand_shards(demo.train_pattern)}
    params = dict(version=demo_module._VERSION, seed=0, **TINY)
    demo_module._generate_and_publish(demo.root, params)
    assert {p: Path(p).read_bytes() for p in expand_shards(demo.train_pattern)} == before
    assert [n for n in os.listdir(Path(demo.root).parent) if n.startswith(".tmp")] == []


def test_demo_concurrent_first_use(tmp_path: Path) -> None:
    # Two processes import, signal ready, wait for "go", then both generate at once.
    child = textwrap.dedent(f"""
        import dataclasses, json, os, sys, time
        from data.demo import ensure_demo_dataset
        open(os.path.join({str(tmp_path)!r}, "ready-" + sys.argv[1]), "w").close()
        while not os.path.exists(os.path.join({str(tmp_path)!r}, "go")):
            time.sleep(0.01)
        demo = ensure_demo_dataset({str(tmp_path / "cache")!r}, seed=3, **{TINY!r})
        print(json.dumps(dataclasses.asdict(demo)))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-c", child]
    procs = [
        subprocess.Popen(command + [str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
            assert all(p.poll() is None for p in procs), "a child died before the race"
            assert time.monotonic() < deadline, "children never got ready"
            time.sleep(0.02)
        (tmp_path / "go").touch()
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outputs
    first, second = (json.loads(out) for out, _ in outputs)
    assert first == second
    assert os.listdir(tmp_path / "cache") == [os.path.basename(first["root"])]  # no temp left
    here = ensure_demo_dataset(tmp_path / "cache", seed=3, **TINY)
    assert json.loads(json.dumps(dataclasses.asdict(here))) == first
    assert len(_all_samples(here.train_pattern)) == 40


# ---------------------------------------------------------------- transforms


def test_decode_rgb_handles_odd_files() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert decode_rgb(simplejpeg.encode_jpeg(rgb)).shape == (20, 30, 3)
    files = {}
    for mode, fmt in [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("P", "PNG")]:
        buffer = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buffer, fmt)
        files[mode, fmt] = decode_rgb(buffer.getvalue())
    assert all(a.shape == (20, 30, 3) and a.dtype == np.uint8 for a in files.values())
    assert np.array_equal(files["RGB", "PNG"], rgb)  # a PNG behind a .jpg name, lossless
    grey = files["L", "JPEG"]
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])
    with pytest.raises(ValueError):
        decode_rgb(b"\xff\xd8\xff not really a jpeg")


def _coordinate_image(height: int, width: int) -> np.ndarray:
    """R = row, G = column mod 256, B = column // 256: every pixel names its position."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows, cols % 256, cols // 256], axis=-1).astype(np.uint8)  # (H, W, 3)


def test_eval_transform_is_the_exact_centre_crop() -> None:
    # 256 × 320: the shorter side is already 256, so the square is columns 32..287 (no
    # resampling) and the centre 224 crop is rows 16..239, columns 48..271.
    image = _coordinate_image(256, 320)
    out = EvalTransform()(image)
    assert out.dtype == np.uint8 and out.shape == (3, 224, 224) and out.flags.c_contiguous
    assert np.array_equal(out, image[16:240, 48:272].transpose(2, 0, 1))


def test_eval_transform_resizes_the_shorter_side() -> None:
    image = np.empty((300, 500, 3), dtype=np.uint8)
    image[:] = (10, 20, 30)
    out = EvalTransform()(image)
    assert out.shape == (3, 224, 224)
    colour = np.array([10, 20, 30], dtype=np.uint8).reshape(3, 1, 1)
    assert np.array_equal(out, np.broadcast_to(colour, out.shape))


def test_train_transform_is_a_random_crop_and_flip_from_the_rng() -> None:
    image = _coordinate_image(256, 300)  # square = columns 22..277
    transform = TrainTransform()
    views = [transform(image, np.random.default_rng(s)) for s in range(6)]
    assert all(v.dtype == np.uint8 and v.shape == (3, 224, 224) for v in views)
    assert np.array_equal(views[0], transform(image, np.random.default_rng(0)))
    assert len({v.tobytes() for v in views}) == 6
    for seed, view in enumerate(views):
        # The draws, in order: top, left in 0..32 (256 - 224 + 1 choices), then the flip.
        rng = np.random.default_rng(seed)
        top, left, flip = rng.integers(33), rng.integers(33), rng.random() < 0.5
        patch = image[top : top + 224, 22 + left : 22 + left + 224]
        patch = patch[:, ::-1] if flip else patch
        assert np.array_equal(view, patch.transpose(2, 0, 1))


@pytest.mark.parametrize("height, width", [(375, 500), (700, 530), (200, 240)])
def test_train_transform_resizes_only_the_patch_it_keeps(height: int, width: int) -> None:
    # Resizing just the patch's source window equals resizing the whole square and cropping,
    # up to the window's whole-pixel start: a shift of at most half an output pixel. On a ramp
    # of `step` grey levels per source pixel that is step * scale / 2 levels, plus rounding.
    from data.transforms import _square

    step = 250 / max(height, width)
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([rows * step, cols * step, (rows + cols) * step / 2], axis=-1).round().astype(np.uint8)
    scale = min(height, width) / 256
    transform = TrainTransform()
    for seed in range(8):
        view = transform(image, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        top, left, flip = rng.integers(33), rng.integers(33), rng.random() < 0.5
        patch = _square(image, 256)[top : top + 224, left : left + 224]
        patch = patch[:, ::-1] if flip else patch
        exact = torch.from_numpy(patch.copy()).permute(2, 0, 1)
        error = torch.from_numpy(view).double() - exact.double()  # (3, 224, 224)
        assert error.abs().max() <= step * max(scale, 1) / 2 + 1.5, (seed, error.abs().max())
        # the shift itself, in output pixels, from the mean error along each ramp: R runs down
        # the rows, G along the columns (4 levels of rounding noise average out over 50k pixels)
        shift_rows, shift_cols = (abs(error[c].mean().item()) / (step * scale) for c in (0, 1))
        assert shift_rows < 0.55 and shift_cols < 0.55, (seed, shift_rows, shift_cols)
        into = np.empty((3, 224, 224), dtype=np.uint8)
        assert transform(image, np.random.default_rng(seed), out=into) is into and np.array_equal(into, view)


def test_normalize_batch_subtracts_only_the_mean() -> None:
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    expected = images.float() - torch.tensor(MEAN_RGB).view(1, 3, 1, 1)
    out = normalize_batch(images)
    assert out.dtype == torch.float32 and torch.allclose(out, expected)
    buffer = torch.empty(2, 3, 5, 7).to(memory_format=torch.channels_last)
    assert normalize_batch(images, out=buffer) is buffer and torch.allclose(buffer, expected)
    assert buffer.is_contiguous(memory_format=torch.channels_last)
    cl = normalize_batch(images, memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, expected)
    with pytest.raises(ValueError):
        normalize_batch(images.float())
    with pytest.raises(ValueError):
        normalize_batch(images, out=torch.empty(2, 3, 5, 6))


# ---------------------------------------------------------------- batch iterator


def _epoch(batches: ShardBatches, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(batches.epoch_batches(epoch))
    return torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])


def test_train_batches_are_deterministic(demo: DemoDataset) -> None:
    small = dict(train=True, seed=5, resize=64, crop=56)
    a = ShardBatches(demo.train_pattern, 16, **small)
    # 40 samples, batches of 16: 2 full batches; the last 8 samples of the order are the remainder.
    assert (a.num_samples, a.batches_per_epoch) == (40, 2)
    batches = list(a.epoch_batches(0))
    assert [(b.images.shape, b.images.dtype, b.labels.shape, b.labels.dtype) for b in batches] == [
        ((16, 3, 56, 56), torch.uint8, (16,), torch.int64)
    ] * 2
    labels = torch.tensor([c for _, _, c in _all_samples(demo.train_pattern)])
    order = a.epoch_order(0)
    assert sorted(order.tolist()) == list(range(40))  # each sample once per epoch
    assert torch.equal(torch.cat([b.labels for b in batches]), labels[order[:32]])
    # Same (seed, epoch): same batches, whatever the instance, thread count or batch size.
    images, _ = _epoch(a, 0)
    for batch_size, threads in [(16, 1), (16, 2), (8, 1)]:
        other = ShardBatches(demo.train_pattern, batch_size, num_threads=threads, **small)
        assert torch.equal(images, _epoch(other, 0)[0][:32]), (batch_size, threads)
    assert torch.equal(images, _epoch(pickle.loads(pickle.dumps(a)), 0)[0])
    # Another epoch: another order.
    assert not np.array_equal(a.epoch_order(1), order)


def test_eval_batches_keep_order_and_pad_the_last_batch(demo: DemoDataset) -> None:
    b = ShardBatches(demo.val_pattern, 8, train=False, seed=0)
    # 20 samples in batches of 8: 8 + 8 + 4, the last padded to 8 with weight-0 rows.
    assert b.batches_per_epoch == 3
    batches = list(b.epoch_batches(0))
    assert [len(x.labels) for x in batches] == [8, 8, 8]
    assert batches[0].images.shape == (8, 3, 224, 224)
    assert batches[0].weights is None and batches[1].weights is None
    assert batches[2].weights.tolist() == [1.0] * 4 + [0.0] * 4
    assert not batches[2].images[4:].any()  # padding rows are zero images
    labels = [c for _, _, c in _all_samples(demo.val_pattern)]
    assert torch.cat([x.labels for x in batches])[:20].tolist() == labels  # every sample, in order
    assert torch.equal(_epoch(b, 0)[0], _epoch(b, 7)[0])  # the epoch changes nothing


def test_too_few_samples_for_one_batch(demo: DemoDataset) -> None:
    with pytest.raises(ValueError, match="no full batch"):
        ShardBatches(demo.val_pattern, 64, train=True, seed=0)
    kept = ShardBatches(demo.val_pattern, 64, train=False, seed=0)  # evaluation pads instead
    assert kept.batches_per_epoch == 1
    (batch,) = kept.epoch_batches(0)
    assert batch.weights.sum().item() == 20


# ---------------------------------------------------------------- import rule

ALLOWED = {"torch", "webdataset", "PIL", "simplejpeg", "numpy", "skimage", "data"}


def test_data_imports_only_what_it_may() -> None:
    for path in sorted((REPO / "data").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                assert root in ALLOWED | sys.stdlib_module_names, f"{path.name} imports {name}"
                assert not name.startswith("torch.distributed"), f"{path.name} imports {name}"


# The tiny demo's digest with the versions of constraints.txt (numpy, Pillow, simplejpeg,
# scikit-image, webdataset): a fresh machine of this project's kind makes these very bytes.
TINY_DEMO_DIGEST = "66f56bad20c535f97c75c4a2d06e14f5a68977acfe20d57ecc7174159ae21cc1"


def test_the_demo_data_is_the_same_bytes_on_every_machine(tiny_demo):
    """README "The demo data": the digest of the shards follows from the seed and the pinned
    library versions alone (mtime 0 in the tars, every draw from numpy generators)."""
    import importlib.metadata

    pins = dict(line.split("==") for line in (Path(__file__).parents[1] / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    installed = {name: importlib.metadata.version(name) for name in pins if name != "torch"}
    if any(installed[name] != pins[name] for name in installed):
        pytest.skip(f"not the pinned versions of constraints.txt: {installed}")
    assert tiny_demo.digest == TINY_DEMO_DIGEST
