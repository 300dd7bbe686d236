"""A CPU tower actor's input staging (cluster/rank/staging.py): each microbatch normalised into a
float buffer the actor keeps from step to step (`HostInputs`), with the same values, memory
format and gradients as new tensors."""

import pytest
import torch

from cluster.rank.staging import HostInputs, StagedBatch

CPU = torch.device("cpu")
FORMATS = (torch.contiguous_format, torch.channels_last)


def batch(seed: int, rows: int = 4, side: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (rows, 3, side, side), dtype=torch.uint8, generator=g)
    return images, torch.randn(rows, 3, generator=g) * 5


def staged(images, lighting, rows, memory_format, host=None) -> list[torch.Tensor]:
    get = StagedBatch(images, lighting, rows, CPU, memory_format, host=host).get
    return [get(i) for i in range(images.shape[0] // rows)]


@pytest.mark.parametrize("memory_format", FORMATS, ids=("contiguous", "channels_last"))
def test_kept_buffers_hold_what_new_tensors_would_and_are_reused_each_step(memory_format):
    host = HostInputs()
    first = staged(*batch(0), 2, memory_format, host)
    for got, new in zip(first, staged(*batch(0), 2, memory_format)):
        assert torch.equal(got, new) and got.is_contiguous(memory_format=memory_format)
    addresses = [x.data_ptr() for x in first]
    assert len(set(addresses)) == 2  # two microbatches in flight: a buffer each
    second = staged(*batch(1), 2, memory_format, host)
    assert [x.data_ptr() for x in second] == addresses  # the next step: the same memory
    for got, new in zip(second, staged(*batch(1), 2, memory_format)):
        assert torch.equal(got, new)
    kept = host.nbytes
    smaller = staged(*batch(2, rows=2), 2, memory_format, host)  # a shorter batch: a view
    assert smaller[0].data_ptr() == addresses[0] and host.nbytes == kept
    assert torch.equal(smaller[0], staged(*batch(2, rows=2), 2, memory_format)[0])
    larger = staged(*batch(3, rows=8), 4, memory_format, host)  # more rows: the buffer grows
    assert host.nbytes > kept and torch.equal(larger[1], staged(*batch(3, rows=8), 4, memory_format)[1])


def test_an_evaluation_keeps_one_buffer_for_all_its_microbatches():
    """Without autograd a microbatch's input is dead once its forward returns: stage 0 takes the
    next only then, so a 10-view evaluation batch does not keep ten batches of floats."""
    host, images = HostInputs(), batch(4, rows=8)[0]
    expected = staged(images, None, 2, torch.contiguous_format)
    with torch.no_grad():
        get = StagedBatch(images, None, 2, CPU, torch.contiguous_format, host=host).get
        addresses = set()
        for i, want in enumerate(expected):  # consumed in turn, as an evaluation's forward does
            x = get(i)
            assert torch.equal(x, want), i
            addresses.add(x.data_ptr())
    assert len(addresses) == 1 and host.nbytes == expected[0].numel() * 4


def test_a_step_on_kept_buffers_has_the_gradients_of_one_on_new_tensors():
    """Microbatch i's input is saved by the first layer for its weight gradient; the step's
    backward runs before the next step overwrites the buffer, so every step's gradient is that
    of new tensors (three steps, two microbatches each, channels_last as the actor's default)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    host = HostInputs()
    for step in range(3):
        images, lighting = batch(10 + step)
        grads = []
        for keep in (host, None):
            conv.zero_grad()
            for x in staged(images, lighting, 2, torch.channels_last, keep):
                (conv(x) ** 2).mean().backward()
            grads.append(conv.weight.grad.clone())
        assert torch.equal(grads[0], grads[1]), step
