"""Data: shards on disk, the embedded demo dataset, the paper's transforms, a batch iterator.

- ``data.shards``: write, name and read WebDataset tar shards of ``(key, jpg, cls)``.
- ``data.demo``: a ten-class demo dataset made from scikit-image's bundled photos.
- ``data.transforms``: decoding, the paper's train crops, PCA colour noise, centre and ten-view
  eval crops, mean subtraction.
- ``data.loader``: ``ShardBatches``, exact, resumable ``Batch``es per replica and epoch.
- ``data._jpegroi``: C extension (data/_jpegroi.c) that decodes only a region of a JPEG with
  libjpeg-turbo, for the training views; optional, ``data.transforms`` falls back to whole images.

Imports only torch, webdataset, PIL, simplejpeg, numpy, skimage and the standard library.
"""
