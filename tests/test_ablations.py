"""The paper's ablation switches, each proved the same four ways: the network it builds (pieces,
shapes, the exact parameter count), the two-tower mesh of real actors against the reference with
the switch on (tolerances: tests/parity.py), a 2-step driver run whose checkpoint records it, and
the architecture check that refuses to resume that checkpoint without it."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from cluster import export
from cluster.ckpt import checkpoint, consolidate
from cluster.driver import main
from parity import (FC_WIDTH, assert_evaluation_like, assert_gradients_like, assert_loss_close, assert_trained_like,
                    batches, one_mesh_at_a_time, reference_evaluation, reference_run, replica_weights, small_config,
                    train_mesh)
from stages.config import VARIANTS, ModelConfig
from stages.grouped import GroupedAlexNet, grouped_keys, to_grouped
from stages.lrn import CrossMapLRN, SpatialLRN
from stages.reference import TwoTowerAlexNet, parameter_count
from stages.split import layer_shapes
from stages.tower import LAYERS, HalfTower
from runs import tiny_run_args

# --- the networks (no Ray)


@pytest.mark.parametrize("pooling, window", [("overlapping", 3), ("non-overlapping", 2)])
def test_both_poolings_keep_the_papers_map_sizes(pooling, window):
    # 224: conv1 (224 + 2·2 − 11) // 4 + 1 = 55, then three stride-2 pools of a 3- or 2-wide window:
    # (55 − 3) // 2 + 1 = (55 − 2) // 2 + 1 = 27, 13, 6 (the sides they pool are odd). The demo's
    # 128: 31, then 15, 7, 3 either way.
    for image_size, sides in ((224, (27, 13, 6)), (128, (15, 7, 3))):
        cfg = ModelConfig(pooling=pooling, image_size=image_size)
        shapes = layer_shapes(cfg)
        assert (shapes["conv1"][1], shapes["conv2"][1], shapes["conv5"][1]) == sides
        assert cfg.pool5_size == sides[-1] and shapes["fc6"] == (2048,)
    pools = [m for m in HalfTower(ModelConfig(pooling=pooling), 0).modules() if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride) for p in pools] == [(window, 2)] * 3
    assert parameter_count(ModelConfig(pooling=pooling)) == 60_965_224  # pooling has no parameters


@pytest.mark.parametrize("variant", VARIANTS)
def test_tanh_replaces_every_relu(variant):
    tower = HalfTower(ModelConfig(variant=variant, activation="tanh"), 0)
    for name in LAYERS:
        pieces = dict(tower.layers[name].named_children())
        assert not any(isinstance(m, nn.ReLU) for m in pieces.values()), name
        assert sum(isinstance(m, nn.Tanh) for m in pieces.values()) == (name != "fc8"), name  # fc8: the logits
    conv1 = [name for name, _ in tower.layers["conv1"].named_children()]
    assert conv1 == (["conv", "lrn", "pool", "tanh"] if variant == "cuda-convnet-2012" else ["conv", "tanh", "lrn", "pool"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_lrn_off_removes_both_lrns_and_the_2012_rnorm(variant):
    def norms(cfg):
        return [type(m) for m in TwoTowerAlexNet(cfg).modules() if isinstance(m, (CrossMapLRN, SpatialLRN))]

    assert len(norms(ModelConfig(variant=variant))) == 2 * (3 if variant == "cuda-convnet-2012" else 2)
    assert norms(ModelConfig(variant=variant, lrn="off")) == []
    assert parameter_count(ModelConfig(variant=variant, lrn="off")) == 60_965_224


# One tower of §3.2's footnote (the authors' layers-145-half.cfg), at 224 and 1000 classes:
# (layer, weight shape, output shape).
ONE_TOWER_HALF = [
    ("conv1", (48, 3, 11, 11), (48, 27, 27)),
    ("conv2", (128, 48, 5, 5), (128, 13, 13)),
    ("conv3", (192, 128, 3, 3), (192, 13, 13)),  # its own 128 maps: no other tower
    ("conv4", (192, 192, 3, 3), (192, 13, 13)),
    ("conv5", (256, 192, 3, 3), (256, 6, 6)),  # the full conv5
    ("fc6", (4096, 9216), (4096,)),  # 256 · 6 · 6 = 9216
    ("fc7", (4096, 4096), (4096,)),
    ("fc8", (1000, 4096), (1000,)),
]


def test_one_tower_half_is_the_footnotes_net_and_its_parameters_are_counted_exactly():
    cfg = ModelConfig(net="one-tower-half", dropout=0.0)
    net = TwoTowerAlexNet(cfg)
    assert len(net.towers) == 1
    x = torch.randn(2, 3, 224, 224)
    for name, weight, out in ONE_TOWER_HALF:
        block = net.towers[0].layers[name]
        learned = block.conv if hasattr(block, "conv") else block.fc
        assert tuple(learned.weight.shape) == weight and tuple(learned.bias.shape) == (weight[0],), name
        x = block(x)
        assert tuple(x.shape) == (2, *out), name
    # weights + biases: conv1 17,424 + 48; conv2 153,600 + 128; conv3 221,184 + 192; conv4 331,776 +
    # 192; conv5 442,368 + 256; fc6 37,748,736 + 4,096; fc7 16,777,216 + 4,096; fc8 4,096,000 + 1,000
    expected = (17_424 + 48 + 153_600 + 128 + 221_184 + 192 + 331_776 + 192 + 442_368 + 256
                + 37_748_736 + 4_096 + 16_777_216 + 4_096 + 4_096_000 + 1_000)
    assert expected == 59_798_312 == parameter_count(cfg) == sum(p.numel() for p in net.parameters())
    assert parameter_count(ModelConfig()) == 60_965_224  # the two-tower net: 1,166,912 more
    assert cfg.fc8_split == (1000,) and cfg.class_offsets == (0,)
    code = ModelConfig(net="one-tower-half", variant="cuda-convnet-2012")  # layers-145-half.cfg's own style
    assert parameter_count(code) == 59_798_312 and "rnorm" in dict(HalfTower(code, 0).layers["conv2"].named_children())
    with pytest.raises(ValueError, match="tower must be in 0..0 for the one-tower-half net, got 1"):
        HalfTower(cfg, 1)


def test_one_tower_half_exports_as_one_group_network():
    cfg = ModelConfig(net="one-tower-half", num_classes=10, image_size=63, dropout=0.5)
    reference = TwoTowerAlexNet(cfg, seed=1).eval()
    keys = grouped_keys(cfg)
    assert keys["conv3.weight"] == (192, 128, 3, 3) and keys["conv5.weight"] == (256, 192, 3, 3)
    grouped = GroupedAlexNet(cfg).eval()
    grouped.load_state_dict(to_grouped(reference.state_dict(), cfg))
    x = torch.randn(3, 3, 63, 63) * 60
    with torch.no_grad():
        torch.testing.assert_close(grouped(x), reference(x), rtol=1e-5, atol=1e-6)


# --- the mesh against the reference, each switch on (real Ray actors, real gloo)

SWITCHED = {
    "tanh": dict(activation="tanh"),
    "lrn-off": dict(lrn="off"),
    "lrn-off-2012": dict(lrn="off", variant="cuda-convnet-2012"),
    "non-overlapping": dict(pooling="non-overlapping"),
    "lrn-text-alpha": dict(lrn_text_alpha=True),
    "one-tower-half": dict(net="one-tower-half", towers=1),
    "one-tower-half-2-stages": dict(net="one-tower-half", towers=1, stages=2, stage_split="conv1-conv2 | conv3-fc8",
                                    microbatches=2),
}  # the two-tower meshes first: they are one mesh, configured afresh for each (tests/parity.py)


@pytest.mark.parametrize("style", ["paper", "inverted"])
def test_both_dropout_styles_evaluate_like_the_reference(local_ray, style):
    """At test time the paper's dropout multiplies fc6's and fc7's outputs by 0.5 in every tower
    actor, as in the reference; inverted dropout does nothing."""
    config = small_config(dropout=0.5, dropout_style=style)
    images, labels, _ = next(batches(config, 1))
    weights = torch.ones(config.batch_size)
    with one_mesh_at_a_time(lambda: config) as get:
        result = get().evaluate(images, labels, weights)
    assert_evaluation_like(result, reference_evaluation(config, images, labels, weights), config.batch_size, style)


@pytest.fixture(scope="module")
def meshes(local_ray):
    with one_mesh_at_a_time(lambda name: small_config(**SWITCHED[name])) as get:
        yield get


@pytest.mark.parametrize("name", list(SWITCHED))
def test_the_mesh_trains_like_the_reference_with_the_switch_on(meshes, name):
    workers = meshes(name)
    config = workers.config
    ref = reference_run(config)
    workers.reset(config.seed)
    probes = workers.probe(*next(batches(config, 1)))
    for probe in probes:
        if probe.loss is not None:  # the last stage's
            assert_loss_close(probe.loss, ref.loss, f"{name}: rank {probe.rank}")
    assert_gradients_like({n: g for probe in probes for n, g in probe.grads.items()}, ref, name)
    per_rank, losses, _ = train_mesh(workers)
    assert_trained_like(replica_weights(per_rank, workers), losses, ref, name)
    workers.reset(config.seed)
    images, labels, _ = next(batches(config, 1))
    weights = torch.ones(config.batch_size)
    assert_evaluation_like(workers.evaluate(images, labels, weights),
                           reference_evaluation(config, images, labels, weights), config.batch_size, name)


# --- the driver: a 2-step run with each switch; its checkpoint records it and refuses to go on without it

SWITCH_RUNS = [
    (["--activation", "tanh"], "activation='tanh' (now 'relu')"),
    (["--lrn", "off"], "lrn='off' (now 'on')"),
    (["--pooling", "non-overlapping"], "pooling='non-overlapping' (now 'overlapping')"),
    (["--dropout-style", "inverted"], "dropout_style='inverted' (now 'paper')"),
    (["--lrn-text-alpha"], "lrn_text_alpha=True (now False)"),
    (["--net", "one-tower-half", "--towers", "1"], "net='one-tower-half' (now 'two-tower')"),
]  # the one-tower run last: the others run on one kept two-tower mesh


def test_the_2012_variant_evaluates_ten_views_on_two_towers(tiny_demo, tmp_path, capsys, shared_ray):
    """The crash of review: tower 1's fc8 logits are empty with the 2012 code's fc8 on tower 0."""
    args = tiny_run_args(tiny_demo, tmp_path / "run", "--max-steps", "2", "--metrics-addr", "off",
                         "--variant", "cuda-convnet-2012", "--eval-views", "10")
    assert main(args) == 0
    assert "val top-1" in capsys.readouterr().out


@pytest.mark.parametrize("flags, refusal", SWITCH_RUNS, ids=[" ".join(f[:2]) for f, _ in SWITCH_RUNS])
def test_a_two_step_run_with_the_switch_records_it(tiny_demo, tmp_path, capsys, shared_ray, flags, refusal):
    run = tmp_path / "run"
    assert main(tiny_run_args(tiny_demo, run, "--max-steps", "2", "--metrics-addr", "off", *flags)) == 0
    out = capsys.readouterr().out
    assert "network: " in out and "done: 2 steps" in out, out
    saved = checkpoint.read_manifest(str(run / "checkpoint-00000002"))[checkpoint.KEY_CONFIG]
    field, _, value = refusal.partition("=")
    assert repr(saved[field]) == value.split(" (now")[0]
    # the same run dir without the switch: refused before any actor, naming it
    towers = ["--towers", "1"] if "--towers" in flags else []
    assert main(tiny_run_args(tiny_demo, run, "--max-steps", "4", "--metrics-addr", "off", *towers)) == 2
    err = capsys.readouterr().err.strip()
    assert refusal in err and len(err.splitlines()) == 1, err


def test_the_one_tower_net_prints_both_counts_trains_in_two_stages_and_exports(tiny_demo, tmp_path, capsys,
                                                                               shared_ray):
    run = tmp_path / "run"
    args = tiny_run_args(tiny_demo, run, "--max-steps", "2", "--metrics-addr", "off", "--net", "one-tower-half",
                         "--towers", "1", "--stages", "2", "--stage-split", "conv1-conv2 | conv3-fc8",
                         "--microbatches", "2")
    assert main(args) == 0
    out = capsys.readouterr().out
    tiny = ModelConfig(net="one-tower-half", num_classes=10, image_size=64, fc_width=FC_WIDTH)
    two = ModelConfig(num_classes=10, image_size=64, fc_width=FC_WIDTH)
    assert (f"network: one-tower-half (paper variant), {parameter_count(tiny):,} parameters (the two-tower net: "
            f"{parameter_count(two):,}); not the paper's: net one-tower-half, fc_width {FC_WIDTH}") in out, out
    assert export.main([str(run), str(tmp_path / "net.pt")]) == 0
    description = json.loads((tmp_path / "net.json").read_text())
    assert description["model_config"]["net"] == "one-tower-half"
    assert description["parameters"] == parameter_count(tiny)
    for network in ("grouped", "reference"):
        net = export.load_export(str(tmp_path / "net.pt"), network)
        assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("args, message", [
    (["--activation", "sigmoid"], "activation must be one of relu, tanh, got 'sigmoid'"),
    (["--lrn", "no"], "lrn must be one of on, off, got 'no'"),
    (["--pooling", "average"], "pooling must be one of overlapping, non-overlapping, got 'average'"),
    (["--net", "three-tower"], "net must be one of two-tower, one-tower-half, got 'three-tower'"),
    (["--dropout-style", "gaussian"], "dropout_style must be one of paper, inverted, got 'gaussian'"),
    (["--net", "one-tower-half"], "net one-tower-half has one tower, so one process holds it: run it with --towers 1"),
    (["--lr-schedule", "recorded"], "lr_schedule recorded is the cuda-convnet-2012 run's log"),
])
def test_bad_switches_fail_before_any_actor_with_one_line(tiny_demo, tmp_path, capsys, driver_never_starts_ray,
                                                          args, message):
    assert main(tiny_run_args(tiny_demo, tmp_path / "run", *args)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_checkpoint_or_export_from_before_the_switches_keeps_torchs_dropout():
    """A manifest or export description without the switches was trained with the paper's
    network (fc6 and fc7 of 4096 units) and torch.nn.Dropout, the only dropout then: it is read
    so, and resuming it under today's default dropout or another width is refused, naming the field."""
    then = dict(dropout=0.5, fc_width=4096)
    saved = {k: v for k, v in small_config(**then).to_dict().items() if k not in checkpoint.ARCHITECTURE_BEFORE}
    old = {checkpoint.KEY_CONFIG: saved}
    assert consolidate.model_config(old).dropout_style == "inverted"
    assert consolidate.model_config(old) == small_config(**then, dropout_style="inverted").model_config
    description = {"model_config": {k: v for k, v in dataclasses.asdict(small_config().model_config).items()
                                    if k not in checkpoint.ARCHITECTURE_BEFORE}}
    assert consolidate.export_model_config(description).dropout_style == "inverted"
    assert consolidate.export_model_config(description).fc_width == 4096
    with pytest.raises(checkpoint.CheckpointError, match=r"dropout_style='inverted' \(now 'paper'\)"):
        checkpoint.check_compatible(old, small_config(**then).to_dict(), "old")
    with pytest.raises(checkpoint.CheckpointError, match=r"fc_width=4096 \(now 256\)"):
        checkpoint.check_compatible(old, small_config(dropout=0.5, dropout_style="inverted").to_dict(), "old")
    assert checkpoint.check_compatible(old, small_config(**then, dropout_style="inverted").to_dict(), "old") is False
