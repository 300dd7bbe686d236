"""The paper's update rule, hand-computed across a learning-rate drop, the schedules, and an optimizer
that starts without importing torch._dynamo."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from stages.optim import MilestoneSchedule, PaperSGD, PlateauSchedule, Rates, set_rates


def _run(optimizer_cls, lrs, **kwargs):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = optimizer_cls([w], lr=lrs[0], momentum=0.9, weight_decay=0.0005, **kwargs)
    for lr in lrs:
        set_rates(opt, Rates(lr))
        w.grad = torch.tensor([0.5, 0.25])  # a constant gradient keeps the arithmetic readable
        opt.step()
    return w.detach()


def test_matches_hand_computed_update_across_a_drop():
    # v ← 0.9·v − 0.0005·ε·w − ε·g ; w ← w + v, with ε = 0.01, 0.01, then 0.001
    w, v, g = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64), torch.tensor([0.5, 0.25], dtype=torch.float64)
    for eps in (0.01, 0.01, 0.001):
        v = 0.9 * v - 0.0005 * eps * w - eps * g
        w = w + v
    torch.testing.assert_close(_run(PaperSGD, [0.01, 0.01, 0.001]), w.float(), rtol=1e-6, atol=1e-7)


def test_differs_from_torch_sgd_only_after_a_drop():
    constant = [0.01, 0.01, 0.01]
    torch.testing.assert_close(_run(PaperSGD, constant), _run(torch.optim.SGD, constant), rtol=1e-6, atol=1e-7)
    dropped = [0.01, 0.01, 0.001]
    paper, torch_sgd = _run(PaperSGD, dropped), _run(torch.optim.SGD, dropped)
    # after the drop torch rescales the whole velocity by the new ε; the paper keeps the old one
    assert (paper - torch_sgd).abs().max() > 1e-3


def test_plateau_schedule_divides_by_ten_at_most_three_times():
    s = PlateauSchedule(0.01, patience=2, max_drops=3)
    errors = [0.9, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    lrs = [s.end_epoch(e, err) for e, err in enumerate(errors)]
    # improvement at epochs 0, 1, 4; two stale epochs -> drop at 3, 6, 8; never a fourth
    assert lrs[:4] == [0.01, 0.01, 0.01, 0.001]
    assert abs(lrs[6] - 1e-4) < 1e-12 and abs(lrs[8] - 1e-5) < 1e-13 and abs(lrs[-1] - 1e-5) < 1e-13


def test_milestones_reproduce_the_original_run():
    s = MilestoneSchedule(0.01, milestones=(25, 51, 79))
    lr_for_epoch = [s.lr] + [s.end_epoch(e, 0.5) for e in range(90)]  # lr used by epoch e
    assert lr_for_epoch[24] == 0.01 and lr_for_epoch[25] == 0.001
    assert abs(lr_for_epoch[51] - 1e-4) < 1e-12 and abs(lr_for_epoch[79] - 1e-5) < 1e-13
    restored = MilestoneSchedule(0.01)
    restored.load_state_dict(s.state_dict())
    assert restored.lr == s.lr


def test_the_optimizer_a_tower_worker_and_the_parameter_count_never_import_torch_dynamo():
    """torch.optim.Optimizer wraps add_param_group, zero_grad, state_dict and load_state_dict in
    torch._disable_dynamo, whose first call imports torch._dynamo: a second of CPU in every tower
    actor, as long as importing torch; so does a seeded normal_ on the meta device (the driver's
    parameter count). PaperSGD uses those methods as written and init_layer draws nothing on the
    meta device: a fresh interpreter that builds a worker, steps, saves and loads the optimizer
    and counts the parameters has not imported it."""
    tests = Path(__file__).resolve().parent
    script = "\n".join([
        "import sys, torch",
        "from runs import one_process_worker",
        "from stages.optim import PaperSGD",
        "worker = one_process_worker()",
        "w = torch.nn.Parameter(torch.ones(3))",
        "opt = PaperSGD([w], lr=0.1)",
        "w.grad = torch.ones(3)",
        "opt.step()",
        "state = opt.state_dict()",
        "again = PaperSGD([w], lr=0.1)",
        "again.load_state_dict(state)",
        "assert torch.equal(again.state[w]['velocity'], opt.state[w]['velocity'])",
        "again.zero_grad()",
        "assert w.grad is None",
        "worker.optimizer.load_state_dict(worker.optimizer.state_dict())",
        "from stages.config import ModelConfig",
        "from stages.reference import parameter_count",
        "assert parameter_count(ModelConfig()) == 60_965_224",
        "print('torch._dynamo' in sys.modules)",
    ])
    out = subprocess.run([sys.executable, "-c", script], cwd=tests.parent, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": f"{tests.parent}:{tests}"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False"], out.stdout
