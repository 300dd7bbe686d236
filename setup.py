"""Builds ``data._jpegroi``, the region-of-interest JPEG decoder and the training views' resizer
(data/_jpegroi.c, docs/DATA.md), against the system's libjpeg-turbo (Debian: ``apt-get install
gcc libjpeg-dev``). The package metadata is in pyproject.toml. Its AVX2 kernels need no flags:
they are compiled per function (``__attribute__((target("avx2")))``) and used when the CPU has
AVX2.

The extension is optional: without a compiler or libjpeg's header the install goes on with a
warning, and the training loader decodes whole images and resizes them with torch instead (same
batches, slower). CI requires it (``ALEXNET_REQUIRE_JPEGROI=1``, tests/test_jpegroi.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("data._jpegroi", sources=["data/_jpegroi.c"], libraries=["jpeg"], optional=True)
    ]
)
