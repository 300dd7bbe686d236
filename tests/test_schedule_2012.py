"""The 2012 variant's optimizer as layers/layer-params-145.cfg gives it: biases at ε_B = 0.02 (twice
the weights' initial 0.01), kept while the weights' ε drops, without weight decay; the recorded
schedule (weights' ε ÷ 10 after epochs 25, 51, 79; conv1's ÷ 10 and colour noise off after 67;
conv1 frozen after 72; 91 epochs), per layer and group, down to the worker's optimizer and the
loaders' colour noise; the paper variant's one group, bit for bit what it was."""

import json

import pytest
import torch

from cluster.config import ConfigError
from cluster.driver import main
from cluster.rank.pipeline import StepPlan
from cluster.rank.worker import TowerWorker
from cluster.recipes import build_config
from cluster.trainer import make_schedule
from data.loader import ShardBatches
from parity import batches, small_config
from stages.config import ModelConfig
from stages.optim import PaperSGD, Rates, layer_and_kind, param_groups, set_rates
from stages.reference import TwoTowerAlexNet
from stages.tower import LAYERS, HalfTower

# (1-based epoch, conv1 weights' ε, conv1 biases', the other layers' weights', their biases',
# colour noise). Each change comes after the epoch the log names, like the milestones (25 → from
# epoch 26): so epoch 67 still has conv1 at 1e-4 and colour noise, 68 has neither; 72 is conv1's
# last epoch of learning, 73 its first frozen (the final config: conv1 epsW = epsB = 0).
RECORDED = [
    (1, 0.01, 0.02, 0.01, 0.02, True),
    (25, 0.01, 0.02, 0.01, 0.02, True),
    (26, 0.001, 0.02, 0.001, 0.02, True),
    (67, 1e-4, 0.02, 1e-4, 0.02, True),
    (68, 1e-5, 0.02, 1e-4, 0.02, False),
    (72, 1e-5, 0.02, 1e-4, 0.02, False),
    (73, 0.0, 0.0, 1e-4, 0.02, False),
    (80, 0.0, 0.0, 1e-5, 0.02, False),
    (91, 0.0, 0.0, 1e-5, 0.02, False),
]


def rates_in_epoch(config, epoch: int) -> Rates:
    """The ε of every group the trainer hands the actors in (1-based) `epoch`."""
    schedule = make_schedule(config)
    for done in range(epoch - 1):
        schedule.end_epoch(done, 0.5)
    return schedule.rates(config.bias_lr)


def group_rates(optimizer) -> dict[tuple[str, str], float]:
    rates = {}
    for group in optimizer.param_groups:
        key = (group["layer"], group["kind"])
        assert rates.setdefault(key, group["lr"]) == group["lr"], key  # both towers' alike
    return rates


def test_the_recipe_is_the_released_run():
    config = build_config("cuda_convnet_2012")
    assert (config.variant, config.lr_schedule, config.epochs, config.scaled_lr) == (
        "cuda-convnet-2012", "recorded", 91, 0.01)
    assert config.bias_lr == 0.02 and config.lighting_epochs == 67
    assert build_config("alexnet_2012").bias_lr is None and build_config("alexnet_2012").lighting_epochs is None


@pytest.mark.parametrize("epoch, conv1_w, conv1_b, other_w, other_b, noise", RECORDED)
def test_recorded_schedule_per_layer_and_group(tiny_demo, epoch, conv1_w, conv1_b, other_w, other_b, noise):
    config = build_config("cuda_convnet_2012")
    net = HalfTower(config.model_config, tower=0)
    optimizer = PaperSGD(param_groups(net, config.variant), lr=config.lr, weight_decay=config.weight_decay)
    set_rates(optimizer, rates_in_epoch(config, epoch))
    rates = group_rates(optimizer)
    assert set(rates) == {(layer, kind) for layer in LAYERS for kind in ("weight", "bias")}
    for (layer, kind), lr in rates.items():
        expected = (conv1_w, conv1_b) if layer == "conv1" else (other_w, other_b)
        assert lr == pytest.approx(expected[kind == "bias"], rel=1e-12, abs=0.0), (epoch, layer, kind)
    reader = ShardBatches(tiny_demo.train_pattern, 8, train=True, seed=0, resize=72, crop=64,
                          lighting=config.variant, lighting_epochs=config.lighting_epochs)
    assert (reader.lighting_in(epoch - 1) is not None) == noise


def test_biases_have_no_weight_decay_in_the_2012_variant_only():
    code = HalfTower(ModelConfig(variant="cuda-convnet-2012", num_classes=10, image_size=63), tower=0)
    groups = PaperSGD(param_groups(code, "cuda-convnet-2012"), weight_decay=0.0005).param_groups
    assert [(g["layer"], g["kind"], g["weight_decay"]) for g in groups] == [
        (layer, kind, 0.0005 if kind == "weight" else 0.0) for layer in LAYERS for kind in ("weight", "bias")]
    # one tensor a group, in the model's order: optimizer state indices are the model's (checkpoints)
    assert [g["params"][0] for g in groups] == list(code.parameters())
    paper = PaperSGD(param_groups(code, "paper"), weight_decay=0.0005).param_groups
    assert len(paper) == 1 and paper[0]["weight_decay"] == 0.0005 and paper[0]["params"] == list(code.parameters())


def test_a_bias_update_is_the_configs_rule():
    """cuda-convnet's bias `Weights` (wc = 0): v ← 0.9·v − ε_B·g, w ← w + v; the weights keep their
    decay at their own ε; a frozen group (ε = 0) takes no step at all and keeps its velocity."""
    code = HalfTower(ModelConfig(variant="cuda-convnet-2012", num_classes=10, image_size=63), tower=0,
                     layers=("conv1",))
    optimizer = PaperSGD(param_groups(code, "cuda-convnet-2012"), lr=0.01, momentum=0.9, weight_decay=0.0005)
    bias, weight = code.layers["conv1"].conv.bias, code.layers["conv1"].conv.weight
    b, w = bias.detach().double().clone(), weight.detach().double().clone()
    vb, vw = torch.zeros_like(b), torch.zeros_like(w)
    for _ in range(2):  # a constant gradient keeps the arithmetic readable
        bias.grad, weight.grad = torch.full_like(bias, 0.5), torch.full_like(weight, 0.25)
        set_rates(optimizer, Rates(0.001, 0.02))
        optimizer.step()
        vb = 0.9 * vb - 0.02 * 0.5  # no decay term
        vw = 0.9 * vw - 0.0005 * 0.001 * w - 0.001 * 0.25
        b, w = b + vb, w + vw
    torch.testing.assert_close(bias.detach().double(), b, rtol=0, atol=1e-7)
    torch.testing.assert_close(weight.detach().double(), w, rtol=1e-6, atol=1e-9)
    frozen_at, velocity = bias.detach().clone(), optimizer.state[bias]["velocity"].clone()
    bias.grad = torch.full_like(bias, 0.5)
    set_rates(optimizer, Rates(0.001, 0.02, (("conv1", 0.0),)))
    optimizer.step()
    assert torch.equal(bias.detach(), frozen_at) and torch.equal(optimizer.state[bias]["velocity"], velocity)


def test_the_paper_variant_steps_bit_for_bit_as_one_group_did():
    nets = [TwoTowerAlexNet(ModelConfig(num_classes=10, image_size=63, dropout=0.0), seed=2) for _ in range(2)]
    before = PaperSGD(nets[0].parameters())  # what the worker built before groups
    now = PaperSGD(param_groups(nets[1], "paper"))
    x, target = torch.randn(4, 3, 63, 63) * 50, torch.tensor([1, 2, 3, 4])
    for lr in (0.01, 0.01, 0.001):
        for group in before.param_groups:  # what the worker's one ε for all did
            group["lr"] = lr
        set_rates(now, Rates(lr))
        for net, optimizer in zip(nets, (before, now)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), target).backward()
            optimizer.step()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.equal(a, b), name
    saved, ours = before.state_dict(), now.state_dict()  # what a checkpoint holds: the same layout
    assert saved["param_groups"] == ours["param_groups"] and saved["state"].keys() == ours["state"].keys()
    assert all(torch.equal(saved["state"][i]["velocity"], ours["state"][i]["velocity"]) for i in saved["state"])


def test_the_worker_steps_each_group_with_its_rate():
    """A real TowerWorker (both towers in one process, in this one) handed epoch 73's rates: conv1
    does not move, every other layer does."""
    config = small_config(variant="cuda-convnet-2012", towers=1, lr_schedule="recorded")
    threads = torch.get_num_threads()
    try:
        worker = TowerWorker(config, rank=0)
        before = worker.named_parameters()
        rates = rates_in_epoch(config, 73)
        images, labels, lighting = next(batches(config, 1))
        worker.train_step(StepPlan("train", 1, config.batch_size, lr=rates.weights, step=1, rates=rates),
                          images, labels, lighting)
    finally:
        torch.set_num_threads(threads)
    assert group_rates(worker.optimizer)[("conv1", "bias")] == 0.0
    assert group_rates(worker.optimizer)[("conv2", "bias")] == pytest.approx(2 * config.scaled_lr)
    for name, after in worker.named_parameters().items():
        moved = not torch.equal(after, before[name])
        assert moved == (layer_and_kind(name)[0] != "conv1") or after.numel() == 0, name


def test_colour_noise_off_from_an_epoch_changes_nothing_else(tiny_demo):
    common = dict(train=True, seed=0, resize=72, crop=64, lighting="cuda-convnet-2012")
    always = ShardBatches(tiny_demo.train_pattern, 8, **common)
    until = ShardBatches(tiny_demo.train_pattern, 8, lighting_epochs=1, **common)
    on, off = until.batch(0, 0), until.batch(1, 0)
    assert on.lighting is not None and torch.equal(on.lighting, always.batch(0, 0).lighting)
    assert off.lighting is None and always.batch(1, 0).lighting is not None
    assert torch.equal(off.images, always.batch(1, 0).images)  # the same crops: the offset is drawn last
    assert torch.equal(off.labels, always.batch(1, 0).labels)


def test_show_config_prints_the_schedule(tiny_demo, capsys, driver_never_starts_ray):
    # the tiny data has 60 images: batches of 8, at the recipe's ε (no scaling to the smaller batch)
    data = ["--train-data", tiny_demo.train_pattern, "--val-data", tiny_demo.val_pattern, "--batch-size", "8",
            "--lr-scaling", "none"]
    assert main(["--recipe", "cuda_convnet_2012", *data, "--show-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lr_schedule"] == "recorded" and shown["derived"]["bias_lr"] == 0.02
    assert shown["derived"]["lr_schedule"] == [
        "epochs 1–25: weights ε 0.01, biases ε 0.02, colour noise on",
        "epochs 26–51: weights ε 0.001, biases ε 0.02, colour noise on",
        "epochs 52–67: weights ε 0.0001, biases ε 0.02, colour noise on",
        "epochs 68–72: weights ε 0.0001 (conv1 1e-05), biases ε 0.02, colour noise off",
        "epochs 73–79: weights ε 0.0001 (conv1 0), biases ε 0.02 (conv1 0), colour noise off",
        "epochs 80–91: weights ε 1e-05 (conv1 0), biases ε 0.02 (conv1 0), colour noise off",
    ]
    assert main(["--recipe", "demo", "--show-config"]) == 0
    assert json.loads(capsys.readouterr().out)["derived"]["lr_schedule"] == [
        "epochs 1–16: weights ε 0.005, colour noise on", "epochs 17–20: weights ε 0.0005, colour noise on"]


def test_the_recorded_schedule_is_the_2012_variants_only():
    with pytest.raises(ConfigError, match="lr_schedule recorded is the cuda-convnet-2012 run's log"):
        small_config(lr_schedule="recorded")
