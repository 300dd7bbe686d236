"""Two real Ray actors exchanging through real gloo equal the single-process reference network.

Tolerance: every compared tensor satisfies max|ours − reference| ≤ 1e-5 · max|reference| (fp32,
dropout off). The remaining differences are summation order: the reference adds the two towers'
gradient contributions in autograd, the actors in a reduce-scatter.
"""

import pytest
import torch

from cluster import localnet
from cluster.actor_mesh import ActorMesh
from cluster.config import TrainConfig
from stages.loss import cross_entropy_reference
from stages.optim import PaperSGD, set_lr
from stages.reference import TwoTowerAlexNet
from data.transforms import normalize_batch

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


@pytest.mark.parametrize("towers, microbatches, variant", [
    (2, 1, "paper"),               # fc8 split 5/5: tower-sharded log-softmax
    (2, 4, "paper"),
    (2, 1, "cuda-convnet-2012"),   # fc8 wholly on tower 0: the other tower's shard is empty
    (1, 4, "paper"),               # both towers in one actor, local exchange
])
def test_matches_reference(local_ray, towers, microbatches, variant):
    config = small_config(towers=towers, microbatches=microbatches, variant=variant)
    first, final = reference_run(config)
    workers = ActorMesh(config, localnet.loopback_env())
    try:
        probes = workers.call("probe", *next(batches(config, 1)))
        for probe in probes:  # every tower reports the full loss
            assert abs(probe["loss"] - first["loss"]) <= RTOL * abs(first["loss"])
        if microbatches == 1:  # logits: tower 0's classes, then tower 1's
            assert_rel_close(torch.cat([p["logits"] for p in probes], dim=1), first["logits"], "logits")
        grads = {name: g for probe in probes for name, g in probe["grads"].items()}
        assert grads.keys() == first["grads"].keys()
        for name, grad in grads.items():
            assert_rel_close(grad, first["grads"][name], f"gradient of {name}")
        for (images, labels, lighting), lr in zip(batches(config, len(LRS)), LRS):
            workers.call("train_step", images, labels, lr, lighting)
        weights = {name: w for params in workers.call("named_parameters") for name, w in params.items()}
        for name, w in weights.items():
            assert_rel_close(w, final[name], f"weight {name} after {len(LRS)} steps")
    finally:
        workers.shutdown()


def test_microbatch_count_does_not_change_the_result(local_ray):
    weights = {}
    for m in (1, 4):
        config = small_config(towers=2, microbatches=m)
        workers = ActorMesh(config, localnet.loopback_env())
        try:
            for (images, labels, lighting), lr in zip(batches(config, len(LRS)), LRS):
                workers.call("train_step", images, labels, lr, lighting)
            weights[m] = {n: w for params in workers.call("named_parameters") for n, w in params.items()}
        finally:
            workers.shutdown()
    for name in weights[1]:
        assert_rel_close(weights[4][name], weights[1][name], f"{name}: M=4 vs M=1")


@pytest.mark.parametrize("views", [1, 10])
def test_evaluation_matches_reference(local_ray, views):
    """Loss and top-k of the softmax averaged over the paper's ten views (or one), sharded over two
    actors, equal the reference's; a row of weight 0 (padding) does not count."""
    config = small_config(towers=2, num_classes=10)
    images, labels, _ = next(batches(config, 1, views=views if views > 1 else 0))
    weights = torch.ones(config.batch_size)
    weights[-1] = 0.0
    net = TwoTowerAlexNet(config.model_config, seed=config.seed).eval()
    with torch.no_grad():
        flat = images.flatten(0, 1) if views > 1 else images
        probs = net(normalize_batch(flat)).softmax(dim=1).reshape(config.batch_size, views, -1).mean(dim=1)
    losses = -probs.gather(1, labels[:, None]).squeeze(1).log()
    top5 = probs.topk(5, dim=1).indices
    expected_top1 = float(((top5[:, 0] == labels).float() * weights).sum())
    expected_top5 = float(((top5 == labels[:, None]).any(dim=1).float() * weights).sum())
    workers = ActorMesh(config, localnet.loopback_env())
    try:
        results = workers.call("evaluate", images, labels, weights)
    finally:
        workers.shutdown()
    for result in results:
        assert result["images"] == config.batch_size - 1
        assert abs(result["loss_sum"] - float((losses * weights).sum())) <= RTOL * float(losses.sum())
        assert (result["top1"], result["top5"]) == (expected_top1, expected_top5)
