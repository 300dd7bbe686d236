"""What the parity tests share: a small configuration, deterministic batches, the single-process
reference run, and the tolerance.

Tolerance: every compared tensor satisfies max|ours − reference| ≤ 1e-5 · max|reference| (fp32,
dropout off). The remaining differences are summation order: the reference adds the two towers'
gradient contributions in autograd, the actors in a reduce-scatter, and microbatches add their
gradients one at a time.
"""

import contextlib

import torch

from cluster.launch.actor_mesh import ActorMesh
from cluster.config import TrainConfig
from stages.loss import cross_entropy_reference
from stages.optim import PaperSGD, set_lr
from stages.reference import TwoTowerAlexNet
from data.transforms import normalize_batch
from raytools import ensure_shared_ray

RTOL = 1e-5
LRS = (0.01, 0.01, 0.001)  # three steps, across a learning-rate drop


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    if ref.numel() == 0:  # tower 1's fc8 when fc8 is wholly on tower 0
        return
    scale = ref.abs().max().item()
    error = (ours - ref).abs().max().item()
    assert error <= RTOL * max(scale, 1e-12), f"{what}: max error {error:.3g} vs scale {scale:.3g}"


def small_config(**changes) -> TrainConfig:
    # 63×63 input: maps 15/7/3/1, so fc6 reads 2·128·1·1 = 256 values; every layer is still there.
    base = dict(recipe="test", num_classes=10, image_size=63, resize=63, dropout=0.0, batch_size=8,
                train_data="unused", val_data="unused", seed=5, channels_last=False)
    return TrainConfig(**{**base, **changes})


def batches(config: TrainConfig, count: int, views: int = 0):
    """Random uint8 images, labels and PCA colour offsets (or ten views per image, for eval)."""
    g = torch.Generator().manual_seed(11)
    for _ in range(count):
        shape = (config.batch_size,) + ((views,) if views else ()) + (3, config.image_size, config.image_size)
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        labels = torch.randint(0, config.num_classes, (config.batch_size,), generator=g)
        yield images, labels, torch.randn(config.batch_size, 3, generator=g) * 5


def reference_run(config: TrainConfig):
    """Gradients of the first batch, then the weights after len(LRS) steps, in one process."""
    net = TwoTowerAlexNet(config.model_config, seed=config.seed)
    opt = PaperSGD(net.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    first = None
    for (images, labels, lighting), lr in zip(batches(config, len(LRS)), LRS):
        opt.zero_grad()
        logits = net(normalize_batch(images, lighting=lighting))
        loss = cross_entropy_reference(logits, labels)
        loss.backward()
        if first is None:
            first = {"logits": logits.detach(), "loss": loss.item(),
                     "grads": {n: p.grad.clone() for n, p in net.named_parameters()}}
        set_lr(opt, lr)
        opt.step()
    return first, {n: p.detach().clone() for n, p in net.named_parameters()}




def reference_evaluation(config: TrainConfig, images: torch.Tensor, labels: torch.Tensor,
                         weights: torch.Tensor) -> dict:
    """Loss sum and top-1/top-5 hits of the softmax averaged over each image's views (images
    (b, views, 3, h, w), or (b, 3, h, w) for one), rows weighted, in one process."""
    net = TwoTowerAlexNet(config.model_config, seed=config.seed).eval()
    views = images.shape[1] if images.dim() == 5 else 1
    with torch.no_grad():
        flat = images.flatten(0, 1) if views > 1 else images
        probs = net(normalize_batch(flat)).softmax(dim=1).reshape(labels.shape[0], views, -1).mean(dim=1)
    losses = -probs.gather(1, labels[:, None]).squeeze(1).log()
    top5 = probs.topk(5, dim=1).indices
    return {"loss_sum": float((losses * weights).sum()),
            "top1": float(((top5[:, 0] == labels).float() * weights).sum()),
            "top5": float(((top5 == labels[:, None]).any(dim=1).float() * weights).sum())}


@contextlib.contextmanager
def one_mesh_at_a_time(make_config):
    """The session's local Ray (tests/conftest.py) and `get(*args, **kwargs)`: the actor mesh of
    `make_config(*args, **kwargs)`, reused while the arguments are the same (`reset` gives fresh
    weights); other arguments shut the current mesh down first (the CPUs hold one)."""
    ensure_shared_ray()
    current: dict = {}

    def get(*args, **kwargs) -> ActorMesh:
        key = (args, tuple(sorted(kwargs.items())))
        if key not in current:
            for workers in current.values():
                workers.shutdown()
            current.clear()
            current[key] = ActorMesh(make_config(*args, **kwargs))
        return current[key]

    try:
        yield get
    finally:
        for workers in current.values():
            workers.shutdown()
