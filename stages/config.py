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
TOWERS = 2  # the paper's network always has two towers; how many processes hold them is cluster's


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

    dropout: float = 0.5
    """Dropout probability on the outputs of fc6 and fc7 (§4.2). 0 turns it off (tests)."""

    lrn_impl: str = "fast"
    """`fast`: our exact hand-written LRN (stages/lrn.py); `torch`: torch.nn.LocalResponseNorm."""

    lrn_text_alpha: bool = False
    """Use the paper text's literal LRN formula (alpha not divided by n, i.e. PyTorch alpha=5e-4)
    instead of what the authors' code computed (alpha/n, PyTorch alpha=1e-4)."""

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.lrn_impl not in LRN_IMPLS:
            raise ValueError(f"lrn_impl must be one of {', '.join(LRN_IMPLS)}, got {self.lrn_impl!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.image_size < 63:
            raise ValueError(
                f"image_size must be at least 63 (smallest input that leaves a 1×1 map after pool5), "
                f"got {self.image_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def fc8_split(self) -> tuple[int, int]:
        """Classes computed by each tower's fc8: split in half (paper) or all on tower 0 (2012 code)."""
        if self.variant == "cuda-convnet-2012":
            return (self.num_classes, 0)
        half = (self.num_classes + 1) // 2
        return (half, self.num_classes - half)

    @property
    def class_offsets(self) -> tuple[int, int]:
        """Index of each tower's first class in the 1000-way softmax."""
        return (0, self.fc8_split[0])

    @property
    def lrn_alpha(self) -> float:
        return 5e-4 if self.lrn_text_alpha else 1e-4

    @property
    def pool5_size(self) -> int:
        """Side of the pooled conv5 map: 6 for 224×224 input."""
        side = (self.image_size + 4 - 11) // 4 + 1  # conv1, stride 4, padding 2: 55
        for _ in range(3):  # three 3×3 stride-2 max-pools, with size-preserving convs between
            side = (side - 3) // 2 + 1  # 27, 13, 6
        return side
