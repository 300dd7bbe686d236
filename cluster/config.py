"""The training configuration: one flat, documented, validated dataclass.

A run is a named recipe (cluster/recipes.py) whose fields command-line flags override:
`--batch-size 64` sets `batch_size`. Every field's `help` is its documentation; every check runs on
construction, before any actor starts, and fails with one line naming the option, the value and
what is allowed.
"""

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from cluster.plan.mesh import Mesh
from cluster.plan.schedule import SCHEDULES
from cluster.rank.precision import PRECISIONS, REDUCE_DTYPES
from stages.config import PAPER_FC_WIDTH, ModelConfig
from stages.optim import BIAS_LR_FACTOR_2012, RecordedSchedule
from stages.split import BALANCE, Split, format_split, resolve_split

LR_SCHEDULES = ("plateau", "milestones", "recorded")
LR_SCALINGS = ("linear", "none")
OVERLAP_CHOICES = ("auto", "on", "off")
DEMO_DATA = "demo"
MAX_LOADERS = 64  # per replica
CPU_ISAS = ("auto", "avx2")
METRICS_PORT = 9408  # the driver's Prometheus port (none of Ray's: 6379, 8265, 10001; its own metrics port is random)


class ConfigError(ValueError):
    """An invalid option; its message is one line that names the option and what is allowed."""


# Every float option's allowed range: (low, high, low included, high included). Each must also be
# finite (NaN passes no comparison, so it would slip through a bare `< 0` check).
FLOAT_RANGES = {
    "dropout": (0.0, 1.0, True, False),
    "bucket_mb": (0.0, math.inf, False, False),
    "max_bad_fraction": (0.0, 1.0, True, True),
    "lr": (0.0, math.inf, True, False),
    "momentum": (0.0, 1.0, True, False),
    "weight_decay": (0.0, math.inf, True, False),
    "collective_timeout_s": (0.0, math.inf, False, False),
    "placement_timeout_s": (0.0, math.inf, False, False),
    "restart_wait_s": (0.0, math.inf, False, False),
    "loader_timeout_s": (0.0, math.inf, False, False),
    "loss_scale": (0.0, math.inf, False, False),
}


def _range_text(low: float, high: float, low_in: bool, high_in: bool) -> str:
    if high == math.inf:
        return f"a finite number {'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    recipe: str = _opt("demo", "named recipe whose values the other flags override", choices=None)

    # --- model (PAPER.md §Architecture)
    variant: str = _opt("paper", "`paper` (the text) or `cuda-convnet-2012` (the authors' released code: LRN "
                                 "before ReLU in conv1, rnorm after conv2, conv3-5 init N(0, 0.03), fc8 on tower "
                                 "0; the biases learn at twice the weights' initial ε, kept while the weights' "
                                 "drops, without weight decay)")
    num_classes: int = _opt(1000, "classes in the softmax; the demo data has its own count")
    image_size: int = _opt(224, "input crop side (224 in the paper)")
    resize: int = _opt(256, "shorter side the image is rescaled to, then centre-cropped square (256)")
    fc_width: int = _opt(PAPER_FC_WIDTH, "units of fc6 and of fc7 over both towers (4096 in the paper, half in each "
                                         "tower); narrower ones keep every layer and crossing at a fraction of the "
                                         "compute")
    dropout: float = _opt(0.5, "dropout on fc6 and fc7 outputs; 0 turns it off")
    dropout_style: str = _opt("paper", "`paper` (§4.2 and the 2012 code): the kept units unscaled in training, "
                                       "outputs × (1 − dropout) at test; `inverted`: torch.nn.Dropout (kept units "
                                       "× 1/(1 − dropout) in training, nothing at test)")
    lrn_impl: str = _opt("fast", "`fast` (exact, hand-written backward) or `torch` (nn.LocalResponseNorm)")
    lrn_text_alpha: bool = _opt(False, "LRN with the paper text's literal α (not divided by n: PyTorch alpha 5e-4) "
                                       "instead of the authors' code's α/n (alpha 1e-4)")
    # the paper's ablations (§3.1-§3.4, Figure 1, §6; `python -m cluster.experiments` runs them)
    activation: str = _opt("relu", "non-linearity after every conv and fc layer: `relu` (§3.1) or `tanh` "
                                   "(Figure 1's saturating unit)")
    lrn: str = _opt("on", "`on`: LRN after conv1 and conv2 (§3.3); `off`: neither, nor the 2012 variant's rnorm")
    pooling: str = _opt("overlapping", "`overlapping`: 3×3 max-pools of stride 2 (§3.4); `non-overlapping`: 2×2 "
                                       "of stride 2 (maps 55/27/13/6 at 224 either way)")
    net: str = _opt("two-tower", "`two-tower` (the paper's) or `one-tower-half`: §3.2's one tower with half the "
                                 "kernels in conv1-conv4 (48, 128, 192, 192), the full conv5 (256) and fc layers "
                                 "(4096, 4096, 1000), no exchange; run it with --towers 1")
    channels_last: bool = _opt(True, "run convolutions in channels_last memory format (NHWC: what cuDNN's "
                                      "tensor-core kernels and oneDNN read without a transpose)")

    # --- precision and the GPU path (cluster/rank/precision.py)
    precision: str = _opt("auto", "compute dtype of the forward passes: fp32, bf16 or fp16 (fp32 master weights "
                                  "and momentum in every case; fp16 adds dynamic loss scaling); auto: bf16 on GPU "
                                  "actors (tensor cores), fp32 on CPUs")
    grad_reduce_dtype: str = _opt("fp32", "dtype of the replicas' gradient all-reduce: fp32, or bf16 (half the bytes "
                                          "on the network; docs/SCALING.md)")
    cpu_isa: str = _opt("auto", "CPU kernels of the tower actors' convolutions and matmuls (oneDNN): `auto`, the "
                                "fastest each CPU has; `avx2`, AVX2 kernels only, so that CPUs with and without "
                                "AVX-512 round alike and a run is bitwise the same on any x86-64 CPU with AVX2")
    tf32: bool = _opt(False, "let fp32 matmuls and convolutions on GPUs use TF32 tensor cores (10-bit mantissa: "
                             "off keeps fp32 runs fp32)")
    cudnn_benchmark: bool = _opt(True, "let cuDNN time its convolution algorithms for each shape once and keep the "
                                       "fastest (GPU actors; the shapes of a run do not change)")
    loss_scale: float = _opt(2.0**16, "fp16: the initial loss scale (halved on an inf/NaN gradient)")
    loss_scale_window: int = _opt(2000, "fp16: finite steps in a row after which the loss scale doubles")

    # --- mesh (cluster/plan/mesh.py)
    replicas: int = _opt(1, "data-parallel replicas of the two-tower network; each reads its own batch_size "
                            "images a step and the replicas average their gradients")
    bucket_mb: float = _opt(25.0, "size of the gradient buckets all-reduced across replicas while backward runs (MiB)")
    overlap_allreduce: str = _opt("auto", "`on`: start each bucket's all-reduce as soon as its gradients are "
                                          "final, during backward; `off`: all after the backward pass; `auto`: on "
                                          "for GPU actors (NCCL runs beside the compute), off on CPUs (gloo's "
                                          "threads would take the cores backward uses: 9% slower measured)")
    stage_resources: str = _opt("", "custom Ray resources that pin stages to nodes, e.g. '0=ssd,2=bigmem': "
                                    "stage 0 only on nodes started with --resources '{\"ssd\": 1}', stage 2 on "
                                    "`bigmem` nodes (each stage asks for 0.01 of its resource)")
    stages: int = _opt(1, "pipeline stages per tower")
    stage_split: str = _opt("flops", "layers of each stage, e.g. 'conv1-conv2 | conv3-fc8', or a split "
                                     "balanced by `flops` (forward+backward multiply-adds) or `time` (each layer "
                                     "timed on the driver's CPU at the microbatch size)")
    schedule: str = _opt("1f1b", "pipeline schedule: `1f1b` (activations of at most `stages` microbatches "
                                 "held per stage) or `gpipe` (all forwards, then all backwards)")
    towers: int = _opt(2, "processes holding the two towers: 2 (one each, the paper) or 1 (both in one)")
    threads_per_worker: int = _opt(1, "torch CPU threads per actor (CPU runs)")

    # --- data
    train_data: str = _opt(DEMO_DATA, "training shards: `demo`, a brace pattern, a glob or a directory")
    val_data: str = _opt(DEMO_DATA, "validation shards, same forms as --train-data")
    pca_lighting: bool = _opt(True, "PCA colour augmentation, with the variant's constants (PAPER.md §Data)")
    eval_views: int = _opt(1, "views per validation image: 1 (centre crop) or 10 (corners, centre and flips)")
    loaders_per_replica: int = _opt(0, "loader actors per replica, on the node of its stage 0; loader k makes "
                                       "the batches b ≡ k (mod K); 0: as many as the node's spare CPUs feed (1 "
                                       "on CPU actors, whose cores train; printed at start)")
    loader_threads: int = _opt(1, "threads decoding each batch in a loader actor (its CPUs)")
    prefetch: int = _opt(2, "batches each loader makes ahead of the step (the object store holds at most "
                            "replicas × loaders × prefetch waiting)")
    loader_timeout_s: float = _opt(120.0, "seconds the driver waits for a loader's batch before it counts as "
                                          "hung (the mesh is rebuilt from the newest checkpoint)")
    max_bad_fraction: float = _opt(0.001, "largest share of unreadable samples before the run stops")
    batch_size: int = _opt(128, "images per optimizer step (per replica)")
    microbatches: int = _opt(1, "microbatches each batch is split into; gradients accumulate")
    epochs: int = _opt(90, "passes over the training data")
    max_steps: int = _opt(0, "stop after this many optimizer steps in total; 0: no limit")

    # --- optimisation (PAPER.md §Training)
    lr: float = _opt(0.01, "initial learning rate ε for lr_batch images a step (see lr_scaling)")
    lr_batch: int = _opt(128, "the global batch (replicas × batch_size) that --lr is given for (the paper's 128)")
    lr_scaling: str = _opt("linear", "learning rate for another global batch: `linear` (ε × global batch / "
                                     "lr_batch, Goyal et al. 2017) or `none` (ε as given)")
    momentum: float = _opt(0.9, "momentum of the paper's update rule")
    weight_decay: float = _opt(0.0005, "weight decay of the paper's update rule")
    lr_schedule: str = _opt("plateau", "`plateau`: ÷10 when validation error stalls; `milestones`: ÷10 at fixed "
                                       "epochs; `recorded` (cuda-convnet-2012): the 2012 run's log, ÷10 after epochs "
                                       "25, 51, 79, conv1's ÷10 after 67 and 0 after 72, colour noise off after 67")
    lr_milestones: tuple[int, ...] = _opt((25, 51, 79), "epochs after which ε ÷ 10 (milestones schedule)")
    lr_patience: int = _opt(2, "epochs without validation improvement before ε ÷ 10 (plateau schedule)")
    lr_max_drops: int = _opt(3, "most learning-rate drops (the paper made three)")
    seed: int = _opt(0, "seed for weights, data order and augmentation")

    # --- run
    run_dir: str = _opt("runs/demo", "where checkpoints and logs go")
    log_every: int = _opt(5, "steps between progress lines")
    checkpoint_every: int = _opt(0, "steps between checkpoints; 0: at the end of every epoch (and always at the end)")
    keep_checkpoints: int = _opt(3, "newest checkpoints kept in run_dir; older ones are deleted")
    keep_every: int = _opt(0, "also keep every checkpoint whose step is a multiple of this; 0: none")
    async_checkpoint: bool = _opt(True, "actors copy their state and write it while the next step runs "
                                        "(the manifest follows that step); off: training waits for the writes")
    resume: str = _opt("auto", "`auto`: continue from run_dir's newest complete checkpoint if there is one; "
                               "`never`; or a checkpoint directory")
    address: str = _opt("", "Ray cluster address; empty: the cluster this job runs in, else a new local one")
    collective_timeout_s: float = _opt(300.0, "seconds a collective may wait before the run fails")
    placement_timeout_s: float = _opt(120.0, "seconds every actor has to start before the run fails")
    restart_wait_s: float = _opt(120.0, "seconds a restart waits for the cluster to have room for the mesh again "
                                        "(a lost node coming back, or an autoscaler adding one) before the run fails")
    max_restarts: int = _opt(3, "times the mesh is rebuilt from the last checkpoint after an actor dies or a "
                                "collective fails or times out, before the run fails")
    trace: str = _opt("", "write a Chrome-trace/Perfetto JSON of step --trace-step across all actors to this file")
    trace_step: int = _opt(2, "the step whose per-actor timeline is printed (pipelines) and --trace records "
                              "(the first pays for warm-up)")
    metrics_addr: str = _opt(f"127.0.0.1:{METRICS_PORT}", "HOST:PORT where the driver serves Prometheus metrics "
                                                          "(/metrics); port 0 picks a free one and prints it; `off`: "
                                                          "none (the history and tables are still written)")
    report: bool = _opt(True, "at the end of the run, write plots and report.md to run_dir/report "
                              "(`python -m cluster.report RUN_DIR` does it any time)")

    def __post_init__(self):
        self._check_floats()
        self._check_positive("num_classes", "image_size", "resize", "threads_per_worker", "loader_threads", "batch_size",
                             "microbatches", "epochs", "log_every", "lr_patience", "trace_step", "lr_batch", "prefetch",
                             "loss_scale_window")
        self._check_non_negative("max_steps", "lr_max_drops", "checkpoint_every", "max_restarts", "keep_every",
                                 "loaders_per_replica")
        if self.loaders_per_replica > MAX_LOADERS:
            raise ConfigError(f"loaders_per_replica must be in 0..{MAX_LOADERS} (0: auto), got {self.loaders_per_replica}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1 (the newest is what a resume needs), got {self.keep_checkpoints}")
        if self.batch_size % self.microbatches:
            raise ConfigError(f"batch_size {self.batch_size} must be divisible by microbatches "
                              f"{self.microbatches}: allowed microbatches are divisors of the batch")
        self._check_choice(schedule=SCHEDULES, lr_schedule=LR_SCHEDULES, lr_scaling=LR_SCALINGS,
                           overlap_allreduce=OVERLAP_CHOICES, precision=PRECISIONS, grad_reduce_dtype=REDUCE_DTYPES,
                           cpu_isa=CPU_ISAS)
        if self.lr_schedule == "recorded" and self.variant != "cuda-convnet-2012":
            raise ConfigError("lr_schedule recorded is the cuda-convnet-2012 run's log (per-layer ε, colour noise "
                              "off): use it with --variant cuda-convnet-2012, or --lr-schedule milestones "
                              "--lr-milestones 25 51 79 for the paper's drops")
        if self.net == "one-tower-half" and self.towers != 1:
            raise ConfigError(f"net one-tower-half has one tower, so one process holds it: run it with --towers 1 "
                              f"(got towers {self.towers})")
        if self.eval_views not in (1, 10):
            raise ConfigError(f"eval_views must be 1 or 10, got {self.eval_views}")
        if self.resize < self.image_size:
            raise ConfigError(f"resize {self.resize} must be at least image_size {self.image_size}")
        self.metrics_endpoint  # validates metrics_addr
        if list(self.lr_milestones) != sorted(set(self.lr_milestones)) or any(m <= 0 for m in self.lr_milestones):
            raise ConfigError(f"lr_milestones must be increasing positive epochs, got {self.lr_milestones}")
        for name in ("train_data", "val_data"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required: `demo`, or a shard pattern such as /data/train-{{000000..000146}}.tar")
        try:
            self.mesh, self.model_config  # each validates itself
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.pinned_stages  # validates stage_resources
        if self.stage_split not in BALANCE:
            try:
                self.split
            except ValueError as err:
                raise ConfigError(f"stage_split: {err}") from None

    def _check_floats(self) -> None:
        for name, (low, high, low_in, high_in) in FLOAT_RANGES.items():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)
                    and (low <= value if low_in else low < value) and (value <= high if high_in else value < high)):
                raise ConfigError(f"{name} must be {_range_text(low, high, low_in, high_in)}, got {value!r}")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def _check_choice(self, **allowed: tuple[str, ...]) -> None:
        for name, choices in allowed.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    def _check_non_negative(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def mesh(self) -> Mesh:
        return Mesh(replicas=self.replicas, stages=self.stages, towers=self.towers)

    @property
    def model_config(self) -> ModelConfig:
        """The network: every ModelConfig field is a field of this configuration, of the same name."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})

    @property
    def bias_lr(self) -> float | None:
        """The biases' constant ε (the 2012 code's ε_B, twice the weights' initial ε); None: the
        paper's one ε for every parameter."""
        return BIAS_LR_FACTOR_2012 * self.scaled_lr if self.variant == "cuda-convnet-2012" else None

    @property
    def lighting_epochs(self) -> int | None:
        """How many epochs from the start have PCA colour noise (the recorded 2012 schedule turned
        it off after epoch 67); None: all of them."""
        return RecordedSchedule.COLOUR_NOISE_EPOCHS if self.lr_schedule == "recorded" else None

    @property
    def split(self) -> Split:
        """The layers of each pipeline stage (stages/split.py); `time` measures, so the driver
        resolves it once (`resolved_split`) and the actors get the table."""
        return resolve_split(self.model_config, self.stages, self.stage_split, self.microbatch_size,
                             self.threads_per_worker)

    def resolved_split(self) -> "TrainConfig":
        """This config with stage_split written out as a table (what every actor must share)."""
        return self.replace(stage_split=format_split(self.split))

    @property
    def pinned_stages(self) -> dict[int, str]:
        """stage_resources parsed: stage index → custom Ray resource its actors need."""
        pinned: dict[int, str] = {}
        for item in filter(None, (part.strip() for part in self.stage_resources.split(","))):
            stage, _, resource = item.partition("=")
            if not stage.strip().isdigit() or not resource.strip() or int(stage) >= self.stages:
                raise ConfigError(f"stage_resources must be STAGE=RESOURCE items with STAGE in 0..{self.stages - 1}, "
                                  f"separated by commas, got {self.stage_resources!r}")
            pinned[int(stage)] = resource.strip()
        return pinned

    @property
    def metrics_endpoint(self) -> tuple[str, int] | None:
        """metrics_addr parsed: (host, port), or None when it is `off`."""
        if self.metrics_addr == "off":
            return None
        host, _, port = self.metrics_addr.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")  # [::1]:9408
        if not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"metrics_addr must be HOST:PORT (port 0..65535, 0: any free one) or `off`, "
                              f"got {self.metrics_addr!r}")
        return host, int(port)

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all replicas."""
        return self.replicas * self.batch_size

    @property
    def scaled_lr(self) -> float:
        """The initial ε this run uses: --lr, for lr_batch images, scaled to the global batch."""
        if self.lr_scaling == "linear":
            return self.lr * self.global_batch / self.lr_batch
        return self.lr

    @property
    def cpus_wanted(self) -> int:
        """CPUs of a local Ray for this run: every tower actor's threads, and each replica's loaders
        (one per replica when --loaders-per-replica is 0, the CPU actors' auto)."""
        loaders = self.replicas * max(self.loaders_per_replica, 1) * self.loader_threads
        return self.mesh.world_size * self.threads_per_worker + loaders

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // self.microbatches

    def replace(self, **changes) -> "TrainConfig":
        try:
            return dataclasses.replace(self, **changes)
        except TypeError as err:
            raise ConfigError(str(err)) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _shown(value) -> str:
    """A field's value as a person types it on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return repr(value) if value == "" else str(value)


def add_arguments(parser: argparse.ArgumentParser, recipe: TrainConfig | None = None) -> None:
    """One `--flag` per TrainConfig field, defaulting to "not given" so the recipe's value stands;
    each help line ends with that value in `recipe` (the one --recipe names)."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == "recipe":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, type) else type(f.default)
        text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if recipe is not None:
            text += f" ({recipe.recipe}: {_shown(getattr(recipe, f.name)).replace('%', '%%')})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind is tuple:
            parser.add_argument(flag, dest=f.name, type=int, nargs="+", default=None, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=text)


def overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the user set on the command line."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"recipe"}
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if "lr_milestones" in given:
        given["lr_milestones"] = tuple(given["lr_milestones"])
    return given
