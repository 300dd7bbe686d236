"""Local response normalisation (PAPER.md §LRN), exact and fast on CPU.

    b_c = a_c / (k + alpha/n · Σ_{c' in window(c)} a_c'²)^beta

over n adjacent maps of the same tower (zero padded at the edges). Dividing alpha by n is what the
authors' code did and what `torch.nn.LocalResponseNorm` computes, so `CrossMapLRN(5, 1e-4, 0.75, 2)`
equals `torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2)` to float rounding (a test checks it).

PyTorch's module builds the window sum with `avg_pool3d` over a padded copy and lets autograd
record every intermediate; on CPU that was ~40% of an AlexNet training step. Here the window sum is
n shifted adds, the denominator power for beta = 0.75 is `rsqrt(d) · sqrt(rsqrt(d))`, and the
backward is written by hand (the window is symmetric, so its transpose is itself):

    ∂L/∂a_c = g_c · d_c^-beta − (2·alpha·beta/n) · a_c · Σ_{j in window(c)} g_j · b_j / d_j

In bf16 or fp16 (autocast) the input is taken up to fp32 and the output given back in the input's
dtype: the power of a sum of squares is where half precision loses most.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_HALF = (torch.float16, torch.bfloat16)  # under autocast LRN still computes in fp32


def _window_sum(x: Tensor, size: int, dim: int) -> Tensor:
    """Σ over `size` neighbours along `dim` centred on each index (zero padded), by shifted adds."""
    before = (size - 1) // 2
    after = size - 1 - before
    total = x.clone()
    length = x.shape[dim]
    for shift in range(1, before + 1):
        if shift < length:
            total.narrow(dim, shift, length - shift).add_(x.narrow(dim, 0, length - shift))
    for shift in range(1, after + 1):
        if shift < length:
            total.narrow(dim, 0, length - shift).add_(x.narrow(dim, shift, length - shift))
    return total


def _inverse_power(d: Tensor, beta: float) -> Tensor:
    """d ** -beta; the common beta = 0.75 via two square roots, cheaper than exp/log."""
    if beta == 0.75:
        r = torch.rsqrt(d)
        return r.mul_(torch.sqrt(r))
    return torch.pow(d, -beta)


class _CrossMapLRN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
        denom = _window_sum(x * x, size, dim=1).mul_(alpha / size).add_(k)
        scale = _inverse_power(denom, beta)
        y = x * scale
        ctx.save_for_backward(x, y, denom, scale)
        ctx.hyper = (size, alpha, beta)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y, denom, scale = ctx.saved_tensors
        size, alpha, beta = ctx.hyper
        ratio = (grad * y).div_(denom)
        dx = _window_sum(ratio, size, dim=1).mul_(x).mul_(-2.0 * alpha * beta / size)
        dx.addcmul_(grad, scale)
        return dx, None, None, None, None


class CrossMapLRN(nn.Module):
    """Drop-in for `torch.nn.LocalResponseNorm` on (b, c, h, w) maps, with a hand-written backward."""

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in _HALF:  # mixed precision: the squares, sums and powers in fp32, the output as the input
            with torch.autocast(x.device.type, enabled=False):
                return _CrossMapLRN.apply(x.float(), self.size, self.alpha, self.beta, self.k).to(x.dtype)
        return _CrossMapLRN.apply(x, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class SpatialLRN(nn.Module):
    """cuda-convnet's `rnorm`: normalise each map by its own size×size neighbourhood.

    b = a / (k + scale/size² · Σ_{size×size window} a²)^pow, zero padded; cuda-convnet divides the
    scale by size² for this layer type and adds 1 (its `minDiv`). Used by the `cuda-convnet-2012`
    variant after conv2's LRN (PAPER.md, last section, item 2). Plain autograd: it is not on the
    paper variant's path.
    """

    def __init__(self, size: int = 5, scale: float = 0.001, power: float = 0.75, k: float = 1.0):
        super().__init__()
        self.size, self.scale, self.power, self.k = size, scale, power, k

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in _HALF:  # as CrossMapLRN: computed in fp32
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.float()).to(x.dtype)
        pad_lo = (self.size - 1) // 2
        pad_hi = self.size - 1 - pad_lo
        squares = F.pad(x * x, (pad_lo, pad_hi, pad_lo, pad_hi))
        window = F.avg_pool2d(squares, self.size, stride=1)  # mean over size² = Σ / size²
        return x * (window * self.scale + self.k).pow(-self.power)

    def extra_repr(self) -> str:
        return f"{self.size}, scale={self.scale}, power={self.power}, k={self.k}"
