"""Two real Ray actors exchanging through real gloo equal the single-process reference network
(tolerances: tests/parity.py): the loss, logits and every gradient of a batch, then every step's
loss and every weight's update over three steps across a learning-rate drop."""

import pytest
import torch

from cluster.launch.actor_mesh import ActorMesh
from parity import (assert_evaluation_like, assert_gradients_like, assert_loss_close, assert_rel_close,
                    assert_trained_like, batches, reference_evaluation, reference_run, replica_weights,
                    small_config, train_mesh)

pytestmark = pytest.mark.ray  # starts Ray or its actors (`make test-fast` leaves these out)


@pytest.mark.parametrize("towers, microbatches, variant", [
    (2, 1, "paper"),               # fc8 split 5/5: tower-sharded log-softmax
    (2, 4, "paper"),
    (2, 1, "cuda-convnet-2012"),   # fc8 wholly on tower 0, per-group ε, biases without decay, conv1 frozen
    (1, 4, "paper"),               # both towers in one actor, local exchange
])
def test_matches_reference(local_ray, towers, microbatches, variant):
    config = small_config(towers=towers, microbatches=microbatches, variant=variant)
    ref = reference_run(config)
    with ActorMesh.take(config) as workers:
        probes = workers.probe(*next(batches(config, 1)))
        for probe in probes:  # every tower reports the full loss
            assert_loss_close(probe.loss, ref.loss, f"rank {probe.rank}")
        if microbatches == 1:  # logits: tower 0's classes, then tower 1's
            assert_rel_close(torch.cat([p.logits for p in probes], dim=1), ref.logits, "logits")
        assert_gradients_like({name: g for probe in probes for name, g in probe.grads.items()}, ref, "probe")
        per_rank, losses, _ = train_mesh(workers)
        assert_trained_like(replica_weights(per_rank, workers), losses, ref, f"towers={towers} M={microbatches}")


def test_microbatch_count_does_not_change_the_result(local_ray):
    weights = {}
    for m in (1, 4):
        config = small_config(towers=2, microbatches=m)
        with ActorMesh.take(config) as workers:
            per_rank, _, _ = train_mesh(workers)
            weights[m] = replica_weights(per_rank, workers)
    for name in weights[1]:
        assert_rel_close(weights[4][name], weights[1][name], f"{name}: M=4 vs M=1")


@pytest.mark.parametrize("views, variant", [(1, "paper"), (10, "paper"), (10, "cuda-convnet-2012")])
def test_evaluation_matches_reference(local_ray, views, variant):
    """Loss and top-k of the softmax averaged over the paper's ten views (or one), sharded over two
    actors, equal the reference's; a row of weight 0 (padding) does not count. With the 2012
    code's fc8 wholly on tower 0, tower 1's logits are empty (b·10, 0): the ten views' average
    must still take them."""
    config = small_config(towers=2, num_classes=10, eval_views=views, variant=variant)
    images, labels, _ = next(batches(config, 1, views=views if views > 1 else 0))
    weights = torch.ones(config.batch_size)
    weights[-1] = 0.0
    expected = reference_evaluation(config, images, labels, weights)
    with ActorMesh.take(config) as workers:
        results = [workers.evaluate(images, labels, weights)]  # the driver's path
        results += workers.evaluate_each(images, labels, weights)  # both towers
    for result in results:  # every tower computes the same totals
        assert_evaluation_like(result, expected, config.batch_size - 1, f"{variant}, {views} view(s)")
