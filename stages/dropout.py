"""Dropout as the paper (§4.2) and the authors' 2012 code (`HiddenSexLayer`, src/layer.cu) do it.

    training: y = a · m,  m_i ~ Bernoulli(1 − p), a fresh mask per forward; the kept units unscaled
    test:     y = a · (1 − p)  (× 0.5 at the paper's p = 0.5)

The backward of training is ∂L/∂a = ∂L/∂y · m (the code's `bpropActs`). `torch.nn.Dropout` is the
inverted form, y = a · m / (1 − p) in training and y = a at test: the same test-time function
only when the next layer's weights are multiplied by 1 − p, and in training it doubles the
activations the next layer sees, which changes the dynamics under the fixed N(0, 0.01) init and
weight decay (tests/test_dropout.py checks both statements).

The mask is drawn from torch's default generator, like nn.Dropout's, so a rank's seed fixes it.
"""

import torch
from torch import Tensor, nn


class PaperDropout(nn.Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0:
            return x
        if not self.training:
            return x * (1.0 - self.p)
        keep = torch.empty_like(x).bernoulli_(1.0 - self.p)  # 1: kept, 0: dropped
        return x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}, kept units unscaled in training, outputs × {1.0 - self.p:g} at test"
