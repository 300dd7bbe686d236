"""An embedded demo dataset: ten classes of natural photographs, generated on first use.

Each class is one real photograph that ships inside the scikit-image wheel (read straight from
its package data folder, so nothing is ever downloaded). Each sample is a random view of its
class photo, made to look like an ImageNet image: a random crop (35–90% of the shorter side,
aspect 3/4–4/3), a random flip, mild blur, colour/brightness/contrast jitter and grain,
resized so the shorter side is 300–500 pixels, then JPEG-encoded at quality 90.

Everything is drawn from ``numpy`` generators seeded by ``(seed, split, class, index)``, so a
seed always gives the same bytes. Train and validation use disjoint streams. Samples are shuffled
across classes before sharding.

Generation is idempotent and safe when several processes ask at once: each builds the dataset
in its own hidden temporary folder and renames it into place; a process that loses the race
discards its copy and uses the winner's.

Run ``python -m data.demo [--root DIR] [--seed N]`` to build it and print its shard patterns.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import simplejpeg
import skimage
from PIL import Image, ImageEnhance, ImageFilter

from data.shards import write_shards

__all__ = ["CLASS_PHOTOS", "DemoDataset", "ensure_demo_dataset", "render_sample"]

log = logging.getLogger(__name__)

# class name → file in skimage's package data folder (all shipped in the wheel; the two grey
# photos are replicated to RGB). Not used: motorcycle_right (the stereo twin of
# motorcycle_left), textures (brick, grass, gravel), synthetic or tiny images.
CLASS_PHOTOS: dict[str, str] = {
    "astronaut": "astronaut.png",
    "cat": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
    "galaxies": "hubble_deep_field.jpg",
    "tissue": "ihc.png",
    "retina": "retina.jpg",
    "cameraman": "camera.png",
    "coins": "coins.png",
}

_VERSION = 1  # bump when rendering changes, so old caches are not reused
_MANIFEST = "manifest.json"
_SPLITS = {"train": 0, "val": 1}  # split → stream id in the seed sequence
_TAG_SAMPLE, _TAG_SHUFFLE = 0, 1  # keep sample and shuffle streams apart
_FOLDER = (  # the cache subfolder, keyed on every parameter
    "demo-v{version}-seed{seed}-train{train_per_class}-val{val_per_class}-shard{samples_per_shard}"
)
_CACHE_ENV = "ALEXNET_DATA_CACHE"
_DEFAULT_CACHE = os.path.join("~", ".cache", "alexnet-towers")


@dataclasses.dataclass(frozen=True)
class DemoDataset:
    """Where a generated demo dataset lives and what it holds."""

    root: str  # the dataset folder
    train_pattern: str  # brace pattern of the train shards, for expand_shards
    val_pattern: str  # brace pattern of the validation shards
    class_names: tuple[str, ...]  # label i is class_names[i]
    num_train: int
    num_val: int

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of every shard's name and bytes, in order: what two machines compare (with the
        versions of constraints.txt a fresh machine makes the digest README.md states)."""
        total = hashlib.sha256()
        for name in sorted(os.listdir(self.root)):
            if name.endswith(".tar"):
                with open(os.path.join(self.root, name), "rb") as f:
                    total.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
        return total.hexdigest()


def ensure_demo_dataset(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    train_per_class: int = 120,
    val_per_class: int = 30,
    samples_per_shard: int = 200,
) -> DemoDataset:
    """Return the demo dataset for these parameters, generating it first if needed.

    Args:
        root: Cache folder; the dataset goes in a subfolder named after all the parameters.
            Defaults to ``$ALEXNET_DATA_CACHE``, else ``~/.cache/alexnet-towers``.
        seed: Seed of every random draw.
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        samples_per_shard: Samples per tar shard.
    """
    _check_int("seed", seed, minimum=0)
    _check_int("train_per_class", train_per_class, minimum=1)
    _check_int("val_per_class", val_per_class, minimum=1)
    _check_int("samples_per_shard", samples_per_shard, minimum=1)
    params = {
        "version": _VERSION,
        "seed": seed,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "samples_per_shard": samples_per_shard,
    }
    cache = os.path.expanduser(os.fspath(root or os.environ.get(_CACHE_ENV) or _DEFAULT_CACHE))
    final = os.path.join(cache, _FOLDER.format(**params))
    if not os.path.exists(final):
        _generate_and_publish(final, params)
    return _load(final, params)


def _check_int(name: str, value: object, minimum: int) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# ---------------------------------------------------------------- publishing


def _generate_and_publish(final: str, params: dict) -> None:
    """Build the dataset in a private temporary folder, then rename it to ``final``."""
    cache = os.path.dirname(final)
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final)}-{os.getpid()}-", dir=cache)
    try:
        start = time.perf_counter()
        _generate(tmp, params)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        log.info("generated demo dataset in %.1f s: %s", time.perf_counter() - start, final)
        try:
            os.rename(tmp, final)  # atomic; fails if another process published first
        except OSError:
            if not os.path.exists(os.path.join(final, _MANIFEST)):
                raise
            log.info("another process published %s first; using its copy", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when our rename won


def _generate(out_dir: str, params: dict) -> None:
    """Write both splits' shards and the manifest into ``out_dir``."""
    photos = [_load_photo(f) for f in CLASS_PHOTOS.values()]
    manifest = dict(params, class_names=list(CLASS_PHOTOS), shards={}, counts={})
    for split in _SPLITS:
        per_class = params[f"{split}_per_class"]
        samples = _split_samples(photos, params["seed"], split, per_class)
        paths = write_shards(samples, out_dir, split, params["samples_per_shard"])
        manifest["shards"][split] = {os.path.basename(p): os.path.getsize(p) for p in paths}
        manifest["counts"][split] = per_class * len(photos)
    with open(os.path.join(out_dir, _MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def _load(final: str, params: dict) -> DemoDataset:
    """Check the published folder against its manifest and describe it."""
    try:
        with open(os.path.join(final, _MANIFEST)) as f:
            manifest = json.load(f)
        problem = _manifest_problem(final, manifest, params)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        problem = f"unreadable manifest: {err}"
    if problem:
        raise ValueError(f"demo dataset {final} is damaged ({problem}); delete it to regenerate")
    shards = manifest["shards"]
    patterns = {split: _brace_pattern(final, split, len(shards[split])) for split in _SPLITS}
    return DemoDataset(
        root=final,
        train_pattern=patterns["train"],
        val_pattern=patterns["val"],
        class_names=tuple(manifest["class_names"]),
        num_train=manifest["counts"]["train"],
        num_val=manifest["counts"]["val"],
    )


def _manifest_problem(final: str, manifest: dict, params: dict) -> str | None:
    """What is wrong with a published folder, or None when its files match its manifest."""
    if {k: manifest.get(k) for k in params} != params:
        return "its parameters differ"
    for split in _SPLITS:
        for shard, size in manifest["shards"][split].items():
            path = os.path.join(final, shard)
            if not os.path.isfile(path) or os.path.getsize(path) != size:
                return f"{shard} is missing or has the wrong size"
    return None


def _brace_pattern(folder: str, prefix: str, num_shards: int) -> str:
    """``folder/prefix-{000000..00000N}.tar`` for ``num_shards`` shards."""
    return os.path.join(folder, f"{prefix}-{{000000..{num_shards - 1:06d}}}.tar")


# ---------------------------------------------------------------- rendering


def _load_photo(filename: str) -> Image.Image:
    """Open a photo from skimage's package data folder as RGB, never downloading."""
    path = os.path.join(os.path.dirname(skimage.__file__), "data", filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the demo needs skimage's bundled photos")
    with Image.open(path) as image:
        return image.convert("RGB")


def _split_samples(
    photos: list[Image.Image], seed: int, split: str, per_class: int
) -> Iterator[tuple[str, bytes, int]]:
    """Yield ``(key, jpg, cls)`` for one split, shuffled across classes."""
    split_id = _SPLITS[split]
    pairs = [(c, i) for c in range(len(photos)) for i in range(per_class)]
    order = np.random.default_rng([seed, _TAG_SHUFFLE, split_id]).permutation(len(pairs))
    names = list(CLASS_PHOTOS)
    for n in order:
        c, i = pairs[n]
        rng = np.random.default_rng([seed, _TAG_SAMPLE, split_id, c, i])
        yield f"{split}_{names[c]}_{i:05d}", render_sample(photos[c], rng), c


def render_sample(photo: Image.Image, rng: np.random.Generator) -> bytes:
    """One ImageNet-like JPEG view of ``photo``, every choice drawn from ``rng``."""
    # Crop: side 35–90% of the shorter side, aspect (w/h) 3/4–4/3 log-uniform, anywhere.
    width, height = photo.size
    side = rng.uniform(0.35, 0.90) * min(width, height)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w, crop_h = min(width, side * np.sqrt(aspect)), min(height, side / np.sqrt(aspect))
    x0, y0 = rng.uniform(0, width - crop_w), rng.uniform(0, height - crop_h)
    # Output size: shorter side 300–500, longer side keeps the crop's aspect.
    short = int(rng.integers(300, 501))
    if crop_w >= crop_h:
        size = (round(short * crop_w / crop_h), short)
    else:
        size = (short, round(short * crop_h / crop_w))
    image = photo.resize(size, Image.BICUBIC, box=(x0, y0, x0 + crop_w, y0 + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 1.5)))
    image = _jitter_colour(image, rng)
    return simplejpeg.encode_jpeg(_add_noise(np.asarray(image), rng), quality=90)


def _jitter_colour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mild white balance and brightness, then saturation and contrast (all in uint8)."""
    gains = rng.uniform(0.95, 1.05, size=3) * rng.uniform(0.8, 1.2)  # per channel × brightness
    ramp = np.arange(256, dtype=np.float64)
    lut = np.concatenate([np.clip(np.rint(ramp * g), 0, 255) for g in gains]).astype(int).tolist()
    image = image.point(lut)  # the lookup table holds 256 entries per channel
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))


def _add_noise(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey film grain of std 0–5 levels: (h, w, 3) uint8 → (h, w, 3) uint8."""
    h, w, _ = pixels.shape
    grain = rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(rng.uniform(0.0, 5.0))
    noisy = pixels.astype(np.int16) + np.rint(grain).astype(np.int16)  # (h, w, 3)
    return np.clip(noisy, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    """``python -m data.demo``: build the demo dataset and print where it is."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_root = f"${_CACHE_ENV} or {_DEFAULT_CACHE}"
    parser.add_argument("--root", default=None, help=f"cache folder (default {default_root})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--train-per-class", type=int, default=120, help="train images per class")
    parser.add_argument("--val-per-class", type=int, default=30, help="validation images per class")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    demo = ensure_demo_dataset(args.root, args.seed, args.train_per_class, args.val_per_class)
    print(f"ready in {time.perf_counter() - start:.1f} s: {demo.root}")
    print(f"train: {demo.num_train} images  {demo.train_pattern}")
    print(f"val:   {demo.num_val} images  {demo.val_pattern}")
    print(f"classes: {', '.join(demo.class_names)}")
    print(f"sha256 of the shards: {demo.digest}")


if __name__ == "__main__":
    main()
