"""The model's configuration: the paper's network (PAPER.md §Architecture) and its variants.

Vocabulary, fixed once for the whole project:
  tower   — one of the paper's two GPU columns (0 or 1); each holds half the kernels of every layer.
  stage   — a position in the pipeline: a run of consecutive layers of one tower.
  replica — a data-parallel copy of the whole two-tower network.
  rank    — one process (one Ray actor).
  axis    — a mesh axis (replica, stage, tower).
  dim     — a tensor dimension.
"""

from dataclasses import dataclass

VARIANTS = ("paper", "cuda-convnet-2012")
LRN_IMPLS = ("fast", "torch")
# The paper's ablations (§3.1–§3.4, Figure 1, §6): each switch's first value is the paper's network.
ACTIVATIONS = ("relu", "tanh")
LRN_CHOICES = ("on", "off")
POOLINGS = ("overlapping", "non-overlapping")
NETS = ("two-tower", "one-tower-half")
DROPOUT_STYLES = ("paper", "inverted")
SWITCHES = {"activation": ACTIVATIONS, "lrn": LRN_CHOICES, "pooling": POOLINGS, "net": NETS,
            "dropout_style": DROPOUT_STYLES}
TOWERS = 2  # the paper's network has two towers; how many processes hold them is cluster's
PAPER_FC_WIDTH = 4096  # units of fc6 and of fc7 over both towers


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """One two-tower AlexNet. Defaults are the paper's; every field is validated on construction."""

    variant: str = "paper"
    """`paper` (the text, our default) or `cuda-convnet-2012` (the authors' released code, PAPER.md
    last section: LRN before ReLU in conv1, a spatial `rnorm` after conv2's LRN, conv3–conv5 init
    N(0, 0.03), fc8 wholly on tower 0)."""

    num_classes: int = 1000
    """Width of the softmax. 1000 for ImageNet; the demo recipe uses its own class count."""

    image_size: int = 224
    """Side of the square input crop. 224 gives the paper's 55/27/13/6 map sizes; smaller inputs
    keep every layer but shrink the maps (and so fc6's input width)."""

    fc_width: int = PAPER_FC_WIDTH
    """Units of fc6 and of fc7 over the whole network: the paper's 4096, 2048 in each tower (the
    one-tower net's one tower holds all). Narrower layers keep every layer and every crossing but
    take far less compute; the tests train them (at the paper's width fc6–fc8 hold 88% of the
    test network's weights and most of its CPU time)."""

    dropout: float = 0.5
    """Dropout probability on the outputs of fc6 and fc7 (§4.2). 0 turns it off (tests)."""

    lrn_impl: str = "fast"
    """`fast`: our exact hand-written LRN (stages/lrn.py); `torch`: torch.nn.LocalResponseNorm."""

    lrn_text_alpha: bool = False
    """Use the paper text's literal LRN formula (alpha not divided by n, i.e. PyTorch alpha=5e-4)
    instead of what the authors' code computed (alpha/n, PyTorch alpha=1e-4)."""

    activation: str = "relu"
    """The non-linearity after every conv and fc layer but fc8: `relu` (§3.1) or `tanh`, the
    saturating unit Figure 1 compares it with."""

    lrn: str = "on"
    """`on`: LRN after conv1 and conv2 (§3.3); `off` removes both, and the 2012 code's `rnorm`."""

    pooling: str = "overlapping"
    """`overlapping`: 3×3 max-pools of stride 2 (§3.4); `non-overlapping`: 2×2 of stride 2. At 224
    both give maps of 55/27/13/6 (floor((55 − 3)/2) + 1 = floor((55 − 2)/2) + 1 = 27, and so on:
    the maps they pool have odd sides)."""

    net: str = "two-tower"
    """`two-tower`: the paper's network; `one-tower-half`: §3.2's comparison net, one tower with
    half the kernels in conv1–conv4 (48, 128, 192, 192) but the full conv5 (256) and full
    fully-connected layers (4096, 4096, 1000), as its footnote says (the authors'
    `layers-145-half.cfg`). It has no cross-tower connection."""

    dropout_style: str = "paper"
    """`paper` (§4.2, and the 2012 code's `HiddenSexLayer`): in training a unit is zeroed with
    probability `dropout` and the kept ones are left as they are; at test every output is
    multiplied by 1 − dropout (0.5). `inverted`: `torch.nn.Dropout`, the kept units ×1/(1 − dropout)
    in training and nothing at test (the same test-time function only with the next layer's
    weights halved, and other training dynamics under the fixed init and weight decay)."""

    def __post_init__(self):
        for name, choices in {"variant": VARIANTS, "lrn_impl": LRN_IMPLS, **SWITCHES}.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.image_size < 63:
            raise ValueError(
                f"image_size must be at least 63 (smallest input that leaves a 1×1 map after pool5), "
                f"got {self.image_size}")
        if self.fc_width < self.towers or self.fc_width % self.towers:
            raise ValueError(f"fc_width must be a positive multiple of {self.towers} (the towers share fc6 and fc7 "
                             f"equally), got {self.fc_width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def towers(self) -> int:
        """Towers of the network: 2, or 1 for the one-tower comparison net."""
        return 1 if self.net == "one-tower-half" else TOWERS

    @property
    def fc8_split(self) -> tuple[int, ...]:
        """Classes computed by each tower's fc8: split in half (paper) or all on tower 0 (2012 code,
        and the one-tower net)."""
        if self.towers == 1:
            return (self.num_classes,)
        if self.variant == "cuda-convnet-2012":
            return (self.num_classes, 0)
        half = (self.num_classes + 1) // 2
        return (half, self.num_classes - half)

    @property
    def class_offsets(self) -> tuple[int, ...]:
        """Index of each tower's first class in the 1000-way softmax."""
        return (0,) if self.towers == 1 else (0, self.fc8_split[0])

    @property
    def lrn_alpha(self) -> float:
        return 5e-4 if self.lrn_text_alpha else 1e-4

    @property
    def pool_size(self) -> int:
        """Side of the max-pooling window (stride 2 either way)."""
        return 3 if self.pooling == "overlapping" else 2

    @property
    def pool5_size(self) -> int:
        """Side of the pooled conv5 map: 6 for 224×224 input."""
        side = (self.image_size + 4 - 11) // 4 + 1  # conv1, stride 4, padding 2: 55
        for _ in range(3):  # three stride-2 max-pools, with size-preserving convs between
            side = (side - self.pool_size) // 2 + 1  # 27, 13, 6
        return side
