"""Two real Ray actors exchanging through real gloo equal the single-process reference network
(tolerance: tests/parity.py)."""

import pytest
import torch

from cluster.launch.actor_mesh import ActorMesh
from parity import LRS, RTOL, assert_rel_close, batches, reference_evaluation, reference_run, small_config

pytestmark = pytest.mark.ray  # starts Ray or its actors (`make test-fast` leaves these out)


@pytest.mark.parametrize("towers, microbatches, variant", [
    (2, 1, "paper"),               # fc8 split 5/5: tower-sharded log-softmax
    (2, 4, "paper"),
    (2, 1, "cuda-convnet-2012"),   # fc8 wholly on tower 0: the other tower's shard is empty
    (1, 4, "paper"),               # both towers in one actor, local exchange
])
def test_matches_reference(local_ray, towers, microbatches, variant):
    config = small_config(towers=towers, microbatches=microbatches, variant=variant)
    first, final = reference_run(config)
    workers = ActorMesh(config)
    try:
        probes = workers.probe(*next(batches(config, 1)))
        for probe in probes:  # every tower reports the full loss
            assert abs(probe.loss - first["loss"]) <= RTOL * abs(first["loss"])
        if microbatches == 1:  # logits: tower 0's classes, then tower 1's
            assert_rel_close(torch.cat([p.logits for p in probes], dim=1), first["logits"], "logits")
        grads = {name: g for probe in probes for name, g in probe.grads.items()}
        assert grads.keys() == first["grads"].keys()
        for name, grad in grads.items():
            assert_rel_close(grad, first["grads"][name], f"gradient of {name}")
        for (images, labels, lighting), lr in zip(batches(config, len(LRS)), LRS):
            workers.train_step(images, labels, lr, lighting)
        weights = {name: w for params in workers.named_parameters() for name, w in params.items()}
        for name, w in weights.items():
            assert_rel_close(w, final[name], f"weight {name} after {len(LRS)} steps")
    finally:
        workers.shutdown()


def test_microbatch_count_does_not_change_the_result(local_ray):
    weights = {}
    for m in (1, 4):
        config = small_config(towers=2, microbatches=m)
        workers = ActorMesh(config)
        try:
            for (images, labels, lighting), lr in zip(batches(config, len(LRS)), LRS):
                workers.train_step(images, labels, lr, lighting)
            weights[m] = {n: w for params in workers.named_parameters() for n, w in params.items()}
        finally:
            workers.shutdown()
    for name in weights[1]:
        assert_rel_close(weights[4][name], weights[1][name], f"{name}: M=4 vs M=1")


@pytest.mark.parametrize("views", [1, 10])
def test_evaluation_matches_reference(local_ray, views):
    """Loss and top-k of the softmax averaged over the paper's ten views (or one), sharded over two
    actors, equal the reference's; a row of weight 0 (padding) does not count."""
    config = small_config(towers=2, num_classes=10, eval_views=views)
    images, labels, _ = next(batches(config, 1, views=views if views > 1 else 0))
    weights = torch.ones(config.batch_size)
    weights[-1] = 0.0
    expected = reference_evaluation(config, images, labels, weights)
    workers = ActorMesh(config)
    try:
        results = [workers.evaluate(images, labels, weights)]  # the driver's path
        results += workers.evaluate_each(images, labels, weights)  # both towers
    finally:
        workers.shutdown()
    for result in results:  # every tower computes the same totals
        assert result.images == config.batch_size - 1
        assert abs(result.loss_sum - expected["loss_sum"]) <= RTOL * abs(expected["loss_sum"])
        assert (result.top1, result.top5) == (expected["top1"], expected["top5"])
