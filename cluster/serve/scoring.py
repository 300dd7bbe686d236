"""One image's views and the network's class probabilities for them, exactly as training's evaluation
computes them, for `cluster.predict` and the actors of `cluster.infer`.

The pixels: `decode_rgb`, then `EvalTransform` (the centre crop) or `TenViewTransform` (the
paper's ten views) of data/transforms.py, the very calls the reader's validation batches make
(data/loader.py `_fill`), so a JPEG gives the same uint8 view from a shard or from a file.

The probabilities: the network is the single-process reference (`TwoTowerAlexNet`, channels-last
like the actors' by default), fed `normalize_batch`, and its logits go through
`sharded_view_average` (stages/loss.py) with the local exchange: the log of the softmax averaged
over the views, the function a tower actor's `evaluate` ranks classes by (there its shard of the
logits with the cross-tower exchange). `Scorer.topk` ranks with `topk` as `sharded_topk_correct`
does, so a class is "top-1" here exactly when the evaluation counts it so for the same logits.
"""

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from cluster.serve.model import Model, one_line
from data.transforms import EvalTransform, TenViewTransform, decode_rgb, normalize_batch, view_transform
from stages.loss import local_exchange, sharded_view_average

def image_views(data: bytes, transform: EvalTransform | TenViewTransform) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) → uint8 (3, crop, crop), or (10, 3, crop, crop) for ten
    views. Raises ValueError when the bytes do not decode as an image."""
    return transform(decode_rgb(data))


class Scorer:
    """The network on one device: uint8 views → the log of the softmax averaged over the views."""

    def __init__(self, model: Model, views: int, device: torch.device | str | None = None,
                 channels_last: bool = True):
        self.views, self.num_classes = views, model.cfg.num_classes
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = model.network(self.device, self.memory_format)

    @torch.no_grad()
    def log_probs(self, images: Tensor) -> Tensor:
        """(b, 3, c, c) or (b, views, 3, c, c) uint8 → (b, classes) float32 on the CPU."""
        if images.shape[0] == 0:
            return torch.empty(0, self.num_classes)
        flat = images.flatten(0, 1) if images.dim() == 5 else images  # the views of an image adjacent
        x = normalize_batch(flat.to(self.device, non_blocking=True), memory_format=self.memory_format)
        return sharded_view_average(self.net(x), self.views, local_exchange).cpu()

    def topk(self, images: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k most probable classes of each image, best first, and their probabilities:
        (b, k) int64 and (b, k) float32."""
        best = self.log_probs(images).topk(min(k, self.num_classes), dim=1)
        return best.indices, best.values.exp()


def image_files(paths: list[str]) -> list[str]:
    """The files `paths` name: each file, and every file under each directory (recursively, in
    name order, hidden ones left out). Raises ValueError for a path that does not exist."""
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            for folder, dirs, names in sorted(os.walk(path)):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [os.path.join(folder, name) for name in sorted(names) if not name.startswith(".")]
        else:
            raise ValueError(f"IMAGE {path} does not exist")
    return files


def predict_files(scorer: Scorer, files: list[str], resize: int, crop: int, topk: int,
                  batch_size: int = 32) -> Iterator[tuple[str, list[tuple[int, float]] | None, str]]:
    """(file, [(class, probability)] best first, "") for each file, in order, `batch_size` at a
    time; (file, None, why) for one that is not an image (or cannot be read)."""
    transform = view_transform(resize, crop, scorer.views)
    for start in range(0, len(files), batch_size):
        chunk, views, errors = files[start:start + batch_size], [], {}
        for file in chunk:
            try:
                with open(file, "rb") as f:
                    views.append(image_views(f.read(), transform))
            except (OSError, ValueError) as err:
                errors[file] = one_line(err)
        if views:
            classes, probs = scorer.topk(torch.from_numpy(np.stack(views)), topk)
            ranked = iter(list(zip(c, p)) for c, p in zip(classes.tolist(), probs.tolist()))
        for file in chunk:
            yield (file, None, errors[file]) if file in errors else (file, next(ranked), "")
