"""Tests of data/loader.py: replica sharding, determinism, resume, bad input, lighting, views.

All on CPU with tiny shards cut from the demo dataset's real photos (downscaled to at most 48
pixels a side, views of 24 from a 32 square), so the whole file takes seconds.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from tartools import write_tar
import simplejpeg
import torch
from PIL import Image

from data.convert import convert
from data.demo import ensure_demo_dataset
from data.loader import Batch, DataError, ShardBatches
from data.shards import expand_shards, read_samples, write_shards
from data.transforms import (
    EvalTransform,
    TenViewTransform,
    TrainTransform,
    decode_rgb,
    pca_lighting_offset,
)

pytestmark = pytest.mark.timeout(60)

SMALL = dict(resize=32, crop=24)
UNEVEN = (7, 3, 11, 5)  # shard sizes: 26 samples
N = sum(UNEVEN)
SEED = 7


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, bytes, int]]:
    """40 ``(key, jpg, cls)`` samples: the demo's photos (10 classes), shrunk to <= 48 px."""
    demo = ensure_demo_dataset(
        tmp_path_factory.mktemp("demo"), train_per_class=3, val_per_class=1, samples_per_shard=64
    )
    samples = []
    for key, jpg, cls in read_samples(expand_shards(f"{demo.train_pattern},{demo.val_pattern}")):
        image = Image.fromarray(decode_rgb(jpg))
        image.thumbnail((48, 48))
        samples.append((key, simplejpeg.encode_jpeg(np.asarray(image), quality=90), cls))
    assert len(samples) == 40
    return samples


def _write_uneven(samples: list, out_dir: Path, sizes: tuple[int, ...] = UNEVEN) -> str:
    """Write ``samples`` into shards of ``sizes``; return a glob naming them in that order."""
    start = 0
    for n, size in enumerate(sizes):
        write_shards(samples[start : start + size], str(out_dir), f"part{n}", size)
        start += size
    return f"{out_dir}/part*.tar"


@pytest.fixture(scope="module")
def uneven(photos: list, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _write_uneven(photos[:N], tmp_path_factory.mktemp("uneven"))


def _train_view(jpg: bytes, epoch: int, index: int, lighting: str = "paper"):
    """What the loader must give sample ``index``: its crop, then its lighting, both drawn from
    ``default_rng([seed, epoch, index])`` in that order."""
    rng = np.random.default_rng([SEED, epoch, index])
    view = torch.from_numpy(TrainTransform(**SMALL)(decode_rgb(jpg), rng))
    return view, pca_lighting_offset(rng, lighting)


def _weights(batch: Batch) -> torch.Tensor:
    """The batch's row weights, ones when it has none."""
    return torch.ones(len(batch.labels)) if batch.weights is None else batch.weights


def _same(a: Batch, b: Batch) -> bool:
    """Bit-for-bit equality of two batches."""

    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    return (a.epoch, a.index) == (b.epoch, b.index) and all(
        eq(getattr(a, f), getattr(b, f))
        for f in ("images", "labels", "lighting", "weights", "indices")
    )


# ---------------------------------------------------------------- sharding by replica


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_train_replicas_share_an_epoch(
    uneven: str, photos: list, replicas: int, threads: int
) -> None:
    batch = 3
    readers = [
        ShardBatches(
            uneven,
            batch,
            train=True,
            seed=SEED,
            replica=r,
            replicas=replicas,
            num_threads=threads,
            **SMALL,
        )
        for r in range(replicas)
    ]
    expected_batches = N // (replicas * batch)  # 8, 4, 2
    assert [r.batches_per_epoch for r in readers] == [expected_batches] * replicas
    assert all(r.num_samples == N for r in readers)
    per_replica = [list(r.epoch_batches(1)) for r in readers]
    assert [len(p) for p in per_replica] == [expected_batches] * replicas
    seen = [i for p in per_replica for b in p for i in b.indices.tolist()]
    # Each sample at most once; all but the remainder N % (R * B) exactly once, and the
    # remainder is the tail of the epoch's permutation.
    usable = N - N % (replicas * batch)
    assert len(seen) == len(set(seen)) == usable
    assert set(range(N)) - set(seen) == set(readers[0].epoch_order(1)[usable:].tolist())
    for p in per_replica:
        for j, b in enumerate(p):
            assert (b.epoch, b.index, b.weights) == (1, j, None)
            assert b.images.shape == (batch, 3, 24, 24) and b.images.dtype == torch.uint8
            assert b.lighting.shape == (batch, 3) and b.lighting.dtype == torch.float32
            for row, index in enumerate(b.indices.tolist()):
                # The view depends only on (seed, epoch, index): not on R, W or the batch.
                view, shift = _train_view(photos[index][1], 1, index)
                assert torch.equal(b.images[row], view)
                assert np.array_equal(b.lighting[row].numpy(), shift)
                assert b.labels[row].item() == photos[index][2]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_eval_replicas_score_every_sample_once(
    uneven: str, photos: list, replicas: int, threads: int
) -> None:
    batch = 4
    readers = [
        ShardBatches(
            uneven,
            batch,
            train=False,
            seed=SEED,
            replica=r,
            replicas=replicas,
            num_threads=threads,
            **SMALL,
        )
        for r in range(replicas)
    ]
    expected_batches = math.ceil(N / (replicas * batch))  # 7, 4, 3
    per_replica = [list(r.epoch_batches(0)) for r in readers]
    assert [len(p) for p in per_replica] == [expected_batches] * replicas
    scored = []
    for r, p in enumerate(per_replica):
        rows = [
            (i, w) for b in p for i, w in zip(b.indices.tolist(), _weights(b).tolist(), strict=True)
        ]
        real = [i for i, w in rows if w == 1.0]
        assert real == list(range(r, N, replicas))  # index order, strided by replica
        assert all(i == -1 for i, w in rows if w == 0.0)  # the rest is padding
        scored += real
        for b in p:
            assert b.lighting is None and b.images.shape == (batch, 3, 24, 24)
            for row, index in enumerate(b.indices.tolist()):
                if index < 0:
                    assert not b.images[row].any() and b.labels[row].item() == 0
                else:
                    view = EvalTransform(**SMALL)(decode_rgb(photos[index][1]))
                    assert np.array_equal(b.images[row].numpy(), view)
                    assert b.labels[row].item() == photos[index][2]
    assert sorted(scored) == list(range(N))


def test_towers_of_a_replica_get_identical_batches(uneven: str) -> None:
    towers = [
        ShardBatches(
            uneven, 3, train=True, seed=SEED, replica=1, replicas=2, num_threads=w, **SMALL
        )
        for w in (1, 2)
    ]
    assert towers[0].fingerprint == towers[1].fingerprint
    for a, b in zip(*(t.epoch_batches(4) for t in towers), strict=True):
        assert _same(a, b)
    first = next(iter(towers[0].epoch_batches(0)))
    assert first.images.shape == (3, 3, 24, 24) and first.labels.shape == (3,)


def test_order_is_a_function_of_seed_and_epoch(uneven: str) -> None:
    def run(seed: int, epoch: int, batch: int = 2) -> list[Batch]:
        return list(
            ShardBatches(uneven, batch, train=True, seed=seed, **SMALL).epoch_batches(epoch)
        )

    first = run(SEED, 0)
    assert all(_same(a, b) for a, b in zip(first, run(SEED, 0), strict=True))
    order = torch.cat([b.indices for b in first])
    assert sorted(order.tolist()) == list(range(N))
    assert not torch.equal(order, torch.cat([b.indices for b in run(SEED, 1)]))
    assert not torch.equal(order, torch.cat([b.indices for b in run(SEED + 1, 0)]))
    # Another batch size: the same sequence of samples and views (24 of them in batches of 4).
    other = run(SEED, 0, batch=4)
    assert torch.equal(torch.cat([b.indices for b in other]), order[:24])
    assert torch.equal(
        torch.cat([b.images for b in other]), torch.cat([b.images for b in first])[:24]
    )


# ---------------------------------------------------------------- resume


def test_resume_continues_bit_for_bit(uneven: str) -> None:
    settings = dict(train=True, seed=SEED, replica=1, replicas=2, **SMALL)
    a = ShardBatches(uneven, 3, **settings)
    assert a.batches_per_epoch == 4
    whole = list(a.epoch_batches(0)) + list(a.epoch_batches(1))
    for k in (0, 1, 3, 4):
        state = json.loads(json.dumps(a.state_dict(0, k)))  # survives a JSON checkpoint
        b = ShardBatches(uneven, 3, num_threads=2, **settings)  # a fresh process would do this
        epoch, start = b.check_state(state)
        assert (epoch, start) == (0, k)
        resumed = list(b.epoch_batches(epoch, start)) + list(b.epoch_batches(epoch + 1))
        assert len(resumed) == len(whole) - k
        assert all(_same(x, y) for x, y in zip(resumed, whole[k:], strict=True)), k
    with pytest.raises(ValueError, match="start_batch"):
        next(a.epoch_batches(0, start_batch=5))
    with pytest.raises(ValueError, match="next_batch"):
        a.state_dict(0, 5)


def test_a_state_from_another_reader_is_refused(uneven: str, photos: list, tmp_path: Path) -> None:
    settings = dict(train=True, seed=SEED, replica=1, replicas=2, **SMALL)
    state = ShardBatches(uneven, 3, **settings).state_dict(2, 1)
    shuffled = _write_uneven(photos[:N][::-1], tmp_path / "shuffled")  # same N, other samples
    others = {
        "seed": ShardBatches(uneven, 3, **dict(settings, seed=SEED + 1)),
        "replicas": ShardBatches(uneven, 3, **dict(settings, replicas=3)),
        "replica": ShardBatches(uneven, 3, **dict(settings, replica=0)),
        "batch_size": ShardBatches(uneven, 2, **settings),
        "train": ShardBatches(uneven, 3, **dict(settings, train=False)),
        "num_samples": ShardBatches(uneven.replace("part*", "part[012]*"), 3, **settings),
        "fingerprint": ShardBatches(shuffled, 3, **settings),
    }
    for field, reader in others.items():
        with pytest.raises(ValueError, match=rf"\b{field} ") as err:
            reader.check_state(state)
        assert "\n" not in str(err.value) and "does not match" in str(err.value)
    same = ShardBatches(uneven, 3, **settings)
    assert same.check_state(state) == (2, 1)
    for bad in ({}, [], dict(state, next_batch=99), dict(state, epoch=-1), dict(state, format="x")):
        with pytest.raises(ValueError):
            same.check_state(bad)


# ---------------------------------------------------------------- bad input


def test_bad_samples_are_skipped_counted_and_logged_once(
    photos: list, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_shards(photos[:6], str(tmp_path), "a-good", 6)
    good = photos[6][1]
    bad = write_tar(tmp_path / "b-bad.tar", [
        ("a.cls", b"1"), ("a.jpg", good),                    # fine: index 6
        ("b.cls", b"2"), ("b.jpg", b"\x00garbage" * 50),     # not an image (decode fails): 7
        ("d.jpg", good),                                     # no cls
        ("e.cls", b"5"),                                     # no jpg
        ("f.cls", b"cat"), ("f.jpg", good),                  # label not an integer
        ("g.cls", b"12"), ("g.jpg", good),                   # label outside 10 classes
        ("h.cls", b"7"), ("h.json", b"{}"), ("h.jpg", good), # fine, extra member ignored: index 8
        ("i.cls", b"3"), ("i.jpg", good),                    # fine: index 9
        ("j.cls", b"3"), ("j.jpg", good),                    # fine: index 10
    ])  # fmt: skip
    pattern = str(tmp_path)
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        val = ShardBatches(
            pattern, 4, train=False, seed=0, num_classes=10, max_bad_fraction=0.5, **SMALL
        )
    assert val.num_samples == 11
    reasons = dict(val.read_stats.reasons)
    assert reasons == {
        "missing cls": 1,
        "missing jpg": 1,
        "cls not an integer": 1,
        "label out of range": 1,
    }
    assert all(f"'{k}' in {bad}" in caplog.text for k in "defg")  # shard and key named
    # Evaluation: the undecodable sample is not scored (weight 0), counted once, logged once.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        for _ in range(2):
            rows = [
                (i, w)
                for b in val.epoch_batches(0)
                for i, w in zip(b.indices.tolist(), _weights(b).tolist(), strict=True)
            ]
    assert [i for i, w in rows if w == 1.0] == [i for i in range(11) if i != 7]
    assert (7, 0.0) in rows
    assert val.read_stats.reasons["undecodable image"] == 1 and val.read_stats.skipped == 5
    assert caplog.text.count("undecodable image") == 1 and f"'b' in {bad}" in caplog.text
    # Training: the bad sample is replaced by the next good one of the epoch's order.
    train = ShardBatches(
        pattern, 2, train=True, seed=SEED, num_classes=10, max_bad_fraction=0.5, **SMALL
    )
    epoch = next(e for e in range(10) if 7 in train.epoch_indices(e))  # 10 of 11 are used
    order = train.epoch_order(epoch).tolist()
    batches = list(train.epoch_batches(epoch))
    used = torch.cat([b.indices for b in batches]).tolist()
    assert len(used) == 10 and 7 not in used and all(b.images.shape[0] == 2 for b in batches)
    planned = train.epoch_indices(epoch).reshape(-1).tolist()
    assert planned == order[:10]
    at = planned.index(7)
    assert used[at] == order[(order.index(7) + 1) % 11]  # the next in the epoch's order
    assert used[:at] + used[at + 1 :] == planned[:at] + planned[at + 1 :]
    # Without num_classes, label 12 is fine.
    assert ShardBatches(pattern, 4, train=False, seed=0, max_bad_fraction=0.5).num_samples == 12


def _member_offsets(path: str) -> list[tuple[int, int]]:
    """(header offset, data offset) of each member."""
    with tarfile.open(path) as tar:
        return [(m.offset, m.offset_data) for m in tar.getmembers()]


@pytest.mark.parametrize(
    "damage", ["cut in data", "cut in header", "garbage header", "not a tar", "empty file"]
)
def test_a_broken_tar_loses_the_rest_of_its_shard(
    photos: list, tmp_path: Path, damage: str
) -> None:
    (path,) = write_shards(photos[:5], str(tmp_path), "a", 5)
    write_shards(photos[5:8], str(tmp_path), "b", 3)
    data = Path(path).read_bytes()
    members = _member_offsets(path)  # cls, jpg of each sample (webdataset sorts them)
    header, body = members[5]  # the third sample's second member
    kept = {
        "cut in data": 2,
        "cut in header": 2,
        "garbage header": 2,
        "not a tar": 0,
        "empty file": 0,
    }
    if damage == "cut in data":
        data = data[: body + 100]
    elif damage == "cut in header":
        data = data[: header + 100]
    elif damage == "garbage header":
        data = data[:header] + b"\x01garbage" * 64 + data[header + 512 :]
    elif damage == "not a tar":
        data = bytes(np.random.default_rng(0).integers(1, 256, 3000, dtype=np.uint8))
    else:
        data = b""
    Path(path).write_bytes(data)
    reader = ShardBatches(str(tmp_path), 1, train=False, seed=0, max_bad_fraction=0.5, **SMALL)
    assert reader.num_samples == kept[damage] + 3
    assert dict(reader.read_stats.reasons) == {"broken tar": 1}
    assert sum(len(b.labels) for b in reader.epoch_batches(0)) == reader.num_samples  # reads fine


def test_too_many_bad_samples_stop_the_run(photos: list, tmp_path: Path) -> None:
    write_shards(photos[:3], str(tmp_path / "scan"), "a", 3)
    write_tar(tmp_path / "scan" / "b.tar", [("x.jpg", photos[3][1])])  # 1 bad of 4 at the scan
    with pytest.raises(DataError) as err:
        ShardBatches(str(tmp_path / "scan"), 1, train=True, seed=0, max_bad_fraction=0.2)
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    assert "max_bad_fraction=0.2" in message and "1 of 4" in message and "25.00%" in message
    assert ShardBatches(str(tmp_path / "scan"), 1, train=True, seed=0, max_bad_fraction=0.25)

    # At load time: 3 of 10 image members are not images; the scan cannot tell.
    members = []
    for n, (key, jpg, cls) in enumerate(photos[:10]):
        image = b"junk" * 40 if n % 3 == 2 else jpg
        members += [(f"{key}.cls", str(cls).encode()), (f"{key}.jpg", image)]
    (tmp_path / "load").mkdir()
    write_tar(tmp_path / "load" / "c.tar", members)
    for threads in (1, 2):
        reader = ShardBatches(
            str(tmp_path / "load"),
            2,
            train=True,
            seed=0,
            max_bad_fraction=0.2,
            num_threads=threads,
            **SMALL,
        )
        assert reader.num_samples == 10
        with pytest.raises(DataError, match=r"3 of 10 .*max_bad_fraction=0\.2"):
            for _ in reader.epoch_batches(0):
                pass

    # Nothing decodes and nothing is too much: a clear error, not an endless search.
    write_tar(tmp_path / "none.tar", [("k.cls", b"0"), ("k.jpg", b"junk" * 40)])
    reader = ShardBatches(str(tmp_path / "none.tar"), 1, train=True, seed=0, max_bad_fraction=1.0)
    with pytest.raises(DataError, match="no sample decodes"):
        next(reader.epoch_batches(0))


@pytest.mark.parametrize(
    "pattern",
    ["{d}/part0-000000.tar,{d}/missing.tar", "{d}/nothing-*.tar", "{d}/no-such-dir", "{d}/empty"],
)
def test_a_missing_shard_is_an_error_at_start(uneven: str, tmp_path: Path, pattern: str) -> None:
    (tmp_path / "empty").mkdir()
    folder = str(tmp_path) if "empty" in pattern else str(Path(uneven).parent)
    pattern = pattern.format(d=folder)
    with pytest.raises(ValueError) as err:
        ShardBatches(pattern, 1, train=True, seed=0)
    assert repr(pattern) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- the converter's manifest


@pytest.fixture(scope="module")
def converted(photos: list, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 40 photos through data.convert (an ImageFolder tree, 7 per shard: 6 shards and the
    manifest.json listing their sample counts, sizes and sha256)."""
    src = tmp_path_factory.mktemp("tree")
    for key, jpg, cls in photos:
        (src / f"class{cls}").mkdir(exist_ok=True)
        (src / f"class{cls}" / f"{key}.jpg").write_bytes(jpg)
    out = tmp_path_factory.mktemp("converted")
    convert(src, out, layout="imagefolder", samples_per_shard=7, workers=1)
    return out


def _copy(folder: Path, to: Path, manifest: bool = True) -> str:
    shutil.copytree(folder, to)
    if not manifest:
        (to / "manifest.json").unlink()
    return str(to)


def test_the_manifest_spares_the_scan(
    converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _copy(converted, tmp_path / "with")
    scanned = ShardBatches(_copy(converted, tmp_path / "without", manifest=False), 3, train=True,
                           seed=SEED, **SMALL)  # fmt: skip
    assert scanned.index_source == "scan"
    opened: list[str] = []
    real_open = tarfile.open

    def counting_open(name, *args, **kwargs):
        opened.append(str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", counting_open)
    reader = ShardBatches(folder, 3, train=True, seed=SEED, **SMALL)
    # Built from the manifest alone: no tar opened, yet N and the batch count are known.
    assert opened == [] and reader.index_source == "manifest"
    assert (reader.num_samples, reader.batches_per_epoch) == (40, 13)  # 40 // 3
    assert reader.read_stats.samples == 40 and reader.read_stats.skipped == 0
    # Each shard is read once, when a batch first needs one of its samples; the batches are
    # those of a reader that scanned.
    for epoch in (0, 1):
        for a, b in zip(reader.epoch_batches(epoch), scanned.epoch_batches(epoch), strict=True):
            assert _same(a, b)
    assert sorted(opened) == sorted(expand_shards(folder))
    # Another reader of the same shards agrees on the fingerprint (not a scanning one's: the
    # manifest's is made of the shards' sha256, the scan's of the index), and resumes.
    again = ShardBatches(folder, 3, train=True, seed=SEED, **SMALL)
    assert again.check_state(reader.state_dict(1, 4)) == (1, 4)
    assert reader.fingerprint != scanned.fingerprint


def test_a_stale_manifest_is_noticed(
    converted: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = Path(_copy(converted, tmp_path / "stale"))
    shard = folder / "train-000002.tar"
    samples = list(read_samples([str(shard)]))
    write_shards(samples[:-1], str(tmp_path), "one-less", 10)  # a shard rewritten since
    (tmp_path / "one-less-000000.tar").replace(shard)
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        reader = ShardBatches(str(folder), 3, train=True, seed=SEED, **SMALL)
    assert reader.index_source == "scan" and reader.num_samples == 39
    [line] = [r.getMessage() for r in caplog.records if "manifest" in r.getMessage()]
    assert "does not match the shards (train-000002.tar is" in line and "\n" not in line
    # Sizes that match but counts that do not (a manifest edited by hand, say): found when the
    # shard is first read, as a one-line DataError.
    folder = Path(_copy(converted, tmp_path / "lying"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    reader = ShardBatches(str(folder), 41, train=False, seed=0, **SMALL)
    assert reader.num_samples == 41
    stale = r"train-000000.tar holds 7 good samples .* says 8: the manifest is stale"
    with pytest.raises(DataError, match=stale):
        next(reader.epoch_batches(0))


# ---------------------------------------------------------------- lighting and views


def test_lighting_and_views(uneven: str, photos: list) -> None:
    for variant in ("paper", "cuda-convnet-2012"):
        reader = ShardBatches(uneven, 4, train=True, seed=SEED, lighting=variant, **SMALL)
        b = next(iter(reader.epoch_batches(3)))
        assert b.lighting.dtype == torch.float32 and b.lighting.shape == (4, 3)
        for row, index in enumerate(b.indices.tolist()):
            view, shift = _train_view(photos[index][1], 3, index, variant)
            assert torch.equal(b.images[row], view)
            assert np.array_equal(b.lighting[row].numpy(), shift)
    dark = ShardBatches(uneven, 4, train=True, seed=SEED, lighting=None, **SMALL)
    b2 = next(iter(dark.epoch_batches(3)))
    assert b2.lighting is None and torch.equal(b2.images, b.images)  # crops don't move
    val = ShardBatches(uneven, 4, train=False, seed=0, **SMALL)  # lighting "paper" is ignored
    assert next(iter(val.epoch_batches(0))).lighting is None
    ten = ShardBatches(uneven, 4, train=False, seed=0, views=10, replica=2, replicas=3, **SMALL)
    batches = list(ten.epoch_batches(0))
    assert all(x.images.shape == (4, 10, 3, 24, 24) for x in batches)
    for x in batches:
        for row, index in enumerate(x.indices.tolist()):
            expected = (
                TenViewTransform(**SMALL)(decode_rgb(photos[index][1]))
                if index >= 0
                else np.zeros((10, 3, 24, 24), dtype=np.uint8)
            )
            assert np.array_equal(x.images[row].numpy(), expected)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(replica=2, replicas=2), "replica"),
        (dict(replica=-1), "replica"),
        (dict(replicas=0), "replicas"),
        (dict(views=5, train=False), "views"),
        (dict(views=10), "views"),  # training takes one view
        (dict(lighting="pca"), "lighting"),
        (dict(max_bad_fraction=1.5), "max_bad_fraction"),
        (dict(max_bad_fraction=-0.1), "max_bad_fraction"),
        (dict(num_threads=0), "num_threads"),
        (dict(seed=-1), "seed"),
        (dict(num_classes=0), "num_classes"),
        (dict(batch_size=9, replicas=3), "no full batch"),  # 26 < 3 × 9
    ],
)
def test_arguments_are_checked(uneven: str, kwargs: dict, word: str) -> None:
    settings = dict(batch_size=1, train=True, seed=0) | kwargs
    with pytest.raises(ValueError, match=word) as err:
        ShardBatches(uneven, **settings)
    assert "\n" not in str(err.value)
