"""`TowerWorker`: the process that owns one (replica, stage, tower) of the mesh.

With towers = 2 it holds one `HalfTower` and exchanges activations with its partner through
torch.distributed (NCCL on GPU, gloo on CPU); with towers = 1 it holds the whole
`TwoTowerAlexNet` and exchanges locally. The driver wraps this class as a Ray actor; nothing here
imports Ray, so tests can also drive it in-process.
"""

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from cluster import checkpoint, localnet
from cluster.config import TrainConfig
from cluster.exchange import ExchangeStats, TowerExchange
from data.transforms import normalize_batch
from stages.loss import (local_exchange, sharded_cross_entropy, sharded_target_value, sharded_topk_correct,
                         sharded_view_average, tower_loss)
from stages.optim import PaperSGD, set_lr
from stages.reference import TwoTowerAlexNet
from stages.tower import HalfTower

INJECT_FAILURE_ENV = "ALEXNET_INJECT_FAILURE"  # "RANK:STEP": that rank raises at that step (tests)


class TowerWorker:
    def __init__(self, config: TrainConfig, rank: int):
        self.config, self.mesh, self.rank = config, config.mesh, rank
        self.coord = self.mesh.coord(rank)
        torch.set_num_threads(config.threads_per_worker)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        model_cfg = config.model_config
        torch.manual_seed(config.seed * 7919 + rank)  # dropout masks differ per rank
        if self.mesh.towers == 2:
            self.model = HalfTower(model_cfg, self.coord.tower, seed=config.seed)
            self.class_offset = model_cfg.class_offsets[self.coord.tower]
            self.reference_prefix = f"towers.{self.coord.tower}."
        else:
            self.model = TwoTowerAlexNet(model_cfg, seed=config.seed)
            self.class_offset, self.reference_prefix = 0, ""
        self.model.to(self.device, memory_format=self.memory_format)
        self.optimizer = PaperSGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                  weight_decay=config.weight_decay)
        self.exchange = local_exchange
        self.exchange_stats = ExchangeStats()
        self.steps_done = 0
        self.failure_step = self._injected_failure_step()

    def _injected_failure_step(self) -> int | None:
        """The step at which this rank must fail, if the environment asks for one (fault tests)."""
        spec = os.environ.get(INJECT_FAILURE_ENV, "")
        if not spec:
            return None
        rank, step = (int(part) for part in spec.split(":"))
        return step if rank == self.rank else None

    # --- process groups, set up like Ray Train's torch backend

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0's answer to "where do we meet": this node's address and a free port on it."""
        import ray  # only to ask for this node's address; the rest of this class runs without Ray

        host = ray.util.get_node_ip_address()
        return host, localnet.free_port(host)

    def init_distributed(self, host: str, port: int) -> str:
        """Join the world's process group, then build each tower group (every rank takes part in
        creating every group, in the same order). Returns the backend used."""
        if self.mesh.world_size == 1:
            return "none"
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=self.config.collective_timeout_s)
        store = localnet.make_store(host, port, self.mesh.world_size, self.rank, timeout)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.mesh.world_size,
                                timeout=timeout)
        for ranks in self.mesh.tower_groups():
            group = dist.new_group(ranks, timeout=timeout)
            if self.rank in ranks and self.mesh.towers > 1:
                self.exchange = TowerExchange(group, self.mesh.towers)
                self.exchange_stats = self.exchange.stats
        return backend

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # --- one step

    def _logits(self, images: Tensor, lighting: Tensor | None = None) -> Tensor:
        """uint8 (b, 3, h, w) -> this process's share of the logits, (b, classes held here).
        `lighting` (b, 3): each image's PCA colour offset, added with the mean subtraction."""
        x = normalize_batch(images.to(self.device, non_blocking=True), memory_format=self.memory_format,
                            lighting=lighting)
        if self.mesh.towers == 2:
            return self.model(x, self.exchange)
        return self.model(x)

    def _accumulate_gradients(self, images: Tensor, labels: Tensor,
                              lighting: Tensor | None = None) -> tuple[float, Tensor | None]:
        """Forward and backward over the batch's microbatches; returns the batch's mean loss and,
        with one microbatch, this process's logits (for tests)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._check_labels(labels)
        labels = labels.to(self.device)
        total, batch, logits = 0.0, images.shape[0], None
        size = self.config.microbatch_size
        shifts = lighting.split(size) if lighting is not None else [None] * self.config.microbatches
        for mb_images, mb_labels, mb_lighting in zip(images.split(size), labels.split(size), shifts):
            logits = self._logits(mb_images, mb_lighting)
            loss = sharded_cross_entropy(logits, mb_labels, self.class_offset, self.exchange)
            weight = mb_images.shape[0] / batch  # the batch loss is the size-weighted mean
            (tower_loss(loss, self.mesh.towers) * weight).backward()
            total += loss.item() * weight
        return total, (logits.detach() if self.config.microbatches == 1 else None)

    def _check_labels(self, labels: Tensor) -> None:
        classes = self.config.num_classes
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(f"labels must be in [0, {classes}) for num_classes {classes}, got "
                             f"[{int(labels.min())}, {int(labels.max())}]: does --num-classes match the data?")

    def train_step(self, images: Tensor, labels: Tensor, lr: float, lighting: Tensor | None = None) -> dict:
        """One optimizer step on one batch; returns what the driver logs."""
        start = time.perf_counter()
        if self.steps_done == self.failure_step:
            raise RuntimeError(f"failure injected by {INJECT_FAILURE_ENV} at rank {self.rank}, step {self.steps_done}")
        self.steps_done += 1
        self.model.train()
        self.exchange_stats.reset()
        set_lr(self.optimizer, lr)
        loss, _ = self._accumulate_gradients(images, labels, lighting)
        self.optimizer.step()
        return {"loss": loss, "images": images.shape[0], "seconds": time.perf_counter() - start,
                "exchange_seconds": self.exchange_stats.seconds,
                "exchange_bytes": self.exchange_stats.bytes_sent}

    @torch.no_grad()
    def evaluate(self, images: Tensor, labels: Tensor, weights: Tensor | None = None) -> dict:
        """Loss sum and top-1/top-5 hits over one validation batch (every tower gets the same).

        images: uint8 (b, 3, h, w), or (b, views, 3, h, w) for the paper's 10-view test, whose
        softmax is averaged over the views. weights (b,): 0 for padding rows, else 1."""
        self.model.eval()
        self._check_labels(labels)
        labels = labels.to(self.device)
        views = images.shape[1] if images.dim() == 5 else 1
        logits = self._logits(images.flatten(0, 1) if views > 1 else images)
        log_probs = sharded_view_average(logits, views, self.exchange)  # (b, classes held here)
        losses = -sharded_target_value(log_probs, labels, self.class_offset, self.exchange)
        w = torch.ones_like(losses) if weights is None else weights.to(losses)
        top1, top5 = sharded_topk_correct(log_probs, labels, self.class_offset, self.exchange, (1, 5), w)
        return {"loss_sum": float((losses * w).sum()), "top1": top1, "top5": top5, "images": float(w.sum())}

    # --- inspection (tests) and checkpoints

    def probe(self, images: Tensor, labels: Tensor, lighting: Tensor | None = None) -> dict:
        """Loss, this process's logits and gradients for one batch, without an optimizer step,
        named as in the reference network (`towers.{t}.layers...`)."""
        self.model.train()
        loss, logits = self._accumulate_gradients(images, labels, lighting)
        grads = {self.reference_prefix + name: p.grad.detach().cpu().clone()
                 for name, p in self.model.named_parameters()}
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "logits": None if logits is None else logits.cpu(), "grads": grads}

    def named_parameters(self) -> dict[str, Tensor]:
        return {self.reference_prefix + name: p.detach().cpu().clone()
                for name, p in self.model.named_parameters()}

    def save(self, directory: str) -> str:
        """Write this rank's shard of a checkpoint; atomic (temp file, fsync, rename)."""
        path = os.path.join(directory, checkpoint.shard_file(self.rank))
        state = {checkpoint.SHARD_MODEL: {k: v.cpu() for k, v in self.model.state_dict().items()},
                 checkpoint.SHARD_OPTIMIZER: self.optimizer.state_dict(),
                 checkpoint.SHARD_COORD: [self.coord.replica, self.coord.stage, self.coord.tower]}
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def load(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, checkpoint.shard_file(self.rank)), weights_only=True,
                           map_location=self.device)
        self.model.load_state_dict(state[checkpoint.SHARD_MODEL])
        self.optimizer.load_state_dict(state[checkpoint.SHARD_OPTIMIZER])
