"""Builds the two C extensions; the package metadata is in pyproject.toml.

- ``data._jpegroi``, the region-of-interest JPEG decoder and the training views' resizer
  (data/_jpegroi.c, docs/DATA.md), against the system's libjpeg-turbo (Debian: ``apt-get install
  gcc libjpeg-dev``).
- ``data._normalize``, a uint8 batch to the network's float input in one pass on a CPU
  (data/_normalize.c; data/normalize.py).

Their AVX2 kernels need no flags: they are compiled per function
(``__attribute__((target("avx2")))``) and used when the CPU has AVX2 (data/_simd.h).

Both are optional: without a compiler or libjpeg's header the install goes on with a warning, the
training loader decodes whole images and resizes them with torch instead, and the batch is
normalised by torch (same bits, slower). CI requires them (``ALEXNET_REQUIRE_JPEGROI=1``,
tests/test_jpegroi.py, tests/test_transforms.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("data._jpegroi", sources=["data/_jpegroi.c"], depends=["data/_simd.h"], libraries=["jpeg"],
                  optional=True),
        Extension("data._normalize", sources=["data/_normalize.c"], depends=["data/_simd.h"], optional=True),
    ]
)
