"""`TowerWorker`: the process that owns one (replica, stage, tower) of the mesh.

It holds its stage's layers (stages/split.py) of one tower — a `HalfTower` that exchanges
activations with its partner tower through torch.distributed (NCCL on GPU, gloo on CPU) — or,
with towers = 1, of both towers (`TwoTowerAlexNet` restricted to those layers, exchanging
locally). Each step the driver hands it a `StepPlan`; it runs its stage's schedule over the
microbatches (cluster/rank/pipeline.py), stage 0 reading the images and the last stage the labels, and
steps its optimizer after the flush. The driver wraps this class as a Ray actor; nothing here
imports Ray, so tests can also drive it in-process. Checkpoint I/O (cluster/ckpt/, which needs
pyarrow) is imported where a checkpoint is written or read, so that bench/gpu_check.py can drive a
worker where only PyTorch is installed.

Precision (cluster/rank/precision.py): each stage's forward runs under autocast in the compute
dtype, the loss in fp32, the weights and momentum stay fp32; fp16 scales the loss.

GPU (each actor sees the one GPU Ray assigned it, as cuda:0, through CUDA_VISIBLE_DEVICES):
cuDNN's algorithm search (--cudnn-benchmark), the TF32 policy (--tf32), channels_last, pinned
host buffers and a copy stream for the input (cluster/rank/staging.py), and no host
synchronisation in the step but the one read of the loss at its end.
"""

import concurrent.futures
import dataclasses
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from cluster import faults
from cluster.config import TrainConfig
from cluster.plan.schedule import forward_actions, stage_actions
from cluster.rank import rendezvous
from cluster.rank.exchange import ExchangeStats, TowerExchange
from cluster.rank.gradsync import GradientSync
from cluster.rank.pipeline import Link, StageLinks, StageRun, StepPlan
from cluster.rank.precision import DTYPES, LossScaler, Precision, resolve
from cluster.rank.procstats import process_stats
from cluster.rank.report import EvalScores, ProbeReport, StepReport
from cluster.rank.staging import HostInputs, PinnedBuffer, StagedBatch, from_object_store
from stages.loss import (local_exchange, sharded_cross_entropy, sharded_target_value, sharded_topk_correct,
                         sharded_view_average, tower_loss)
from stages.optim import PaperSGD, param_groups, set_rates
from stages.reference import TwoTowerAlexNet
from stages.split import boundary_shape
from stages.tower import HalfTower

def _on_cpu(state, copy: bool):
    """`state` with every tensor on the CPU; `copy`: copies that later training cannot change."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=copy)
    if isinstance(state, dict):
        return {key: _on_cpu(value, copy) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_on_cpu(value, copy) for value in state)
    return state


class TowerWorker:
    def __init__(self, config: TrainConfig, rank: int):
        self.config, self.mesh, self.rank = config, config.mesh, rank
        self.coord = self.mesh.coord(rank)
        self.identity = {"rank": rank, **dataclasses.asdict(self.coord)}  # replica, stage, tower
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned this actor: it is cuda:0 here
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.exchange = self.loss_exchange = local_exchange  # activations; the sharded loss's fp32 values
        self.exchange_stats = self.loss_stats = ExchangeStats()
        self.links = StageLinks()
        self.replica_group = None  # the replicas of this (stage, tower), which average gradients
        self.sync: GradientSync | None = None
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._writing: concurrent.futures.Future | None = None
        self.configure(config)

    def configure(self, config: TrainConfig) -> None:
        """Everything `config` sets, and fresh weights: this actor is then as a new one of a mesh
        of `config` would be. The process groups stay, so the mesh's shape and the collective
        timeout must be those it was started with (cluster/launch/actor_mesh.py `take`)."""
        if config.mesh != self.mesh or config.collective_timeout_s != self.config.collective_timeout_s:
            raise ValueError(f"rank {self.rank} of {self.mesh.describe()} (collective timeout "
                             f"{self.config.collective_timeout_s:g} s) cannot become one of {config.mesh.describe()} "
                             f"({config.collective_timeout_s:g} s): start new actors")
        self.finish_save()
        self.config = config
        torch.set_num_threads(config.threads_per_worker)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = config.cudnn_benchmark
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
        self.precision = Precision(resolve(config.precision, self.device.type), self.device)
        self.scaler = LossScaler(config.loss_scale, config.loss_scale_window) if self.precision.name == "fp16" else None
        self.pinned = PinnedBuffer()
        self.host_inputs = HostInputs()
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.layers = config.split[self.coord.stage]
        self.first_stage = self.coord.stage == 0
        self.last_stage = self.coord.stage == self.mesh.stages - 1
        model_cfg = config.model_config
        self.class_offset = model_cfg.class_offsets[self.coord.tower] if self.mesh.towers == 2 else 0
        self.reference_prefix = f"towers.{self.coord.tower}." if self.mesh.towers == 2 else ""
        self.exchange_stats.reset()
        self.loss_stats.reset()
        self.reset(config.seed)
        self.steps_done = 0
        self.failure_step = faults.failure_step(self.rank)

    def reset(self, seed: int) -> None:
        """Fresh weights (the paper's init from `seed`) and optimizer state."""
        model_cfg = self.config.model_config
        torch.manual_seed(seed * 7919 + self.rank)  # dropout masks differ per rank
        if self.mesh.towers == 2:
            self.model = HalfTower(model_cfg, self.coord.tower, self.layers, seed=seed)
        else:
            self.model = TwoTowerAlexNet(model_cfg, seed=seed, layers=self.layers)
        self.model.to(self.device, memory_format=self.memory_format)
        self.optimizer = PaperSGD(param_groups(self.model, self.config.variant), lr=self.config.lr,
                                  momentum=self.config.momentum, weight_decay=self.config.weight_decay)
        self._attach_sync()

    def _attach_sync(self) -> None:
        """Gradient averaging across replicas for this model's parameters (none with one replica)."""
        if self.sync is not None:
            self.sync.remove()
            self.sync = None
        if self.replica_group is not None:
            self.sync = GradientSync(self.model.parameters(), self.replica_group, self.mesh.replicas,
                                     bucket_bytes=int(self.config.bucket_mb * 2**20),
                                     overlap=self._overlap_allreduce(),
                                     reduce_dtype=DTYPES[self.config.grad_reduce_dtype])

    def _overlap_allreduce(self) -> bool:
        """--overlap-allreduce: `auto` overlaps on GPUs only (bench/scaling.py, docs/BENCHMARKS.md)."""
        if self.config.overlap_allreduce == "auto":
            return self.device.type == "cuda"
        return self.config.overlap_allreduce == "on"

    # --- process groups, set up like Ray Train's torch backend

    def where(self) -> dict:
        """This actor's node, address, GPUs and process (the driver's placement table)."""
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "address": ray.util.get_node_ip_address(),
                "host": socket.gethostname(), "gpus": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid()}

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0's answer to "where do we meet": this node's address and a free port on it."""
        import ray  # only to ask for this node's address; the rest of this class runs without Ray

        host = ray.util.get_node_ip_address()
        return host, rendezvous.free_port(host)

    def init_distributed(self, host: str, port: int) -> str:
        """Join the world's process group, then build each tower group and the two groups of each
        stage link (every rank takes part in creating every group, in the same order). Returns
        the backend used."""
        if self.mesh.world_size == 1:
            return "none"
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=self.config.collective_timeout_s)
        store = rendezvous.make_store(host, port, self.mesh.world_size, self.rank, timeout)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.mesh.world_size,
                                timeout=timeout)
        for ranks in self.mesh.tower_groups():
            group = dist.new_group(ranks, timeout=timeout)
            if self.rank in ranks and self.mesh.towers > 1:
                self.exchange = TowerExchange(group, self.mesh.towers)
                self.loss_exchange = TowerExchange(group, self.mesh.towers)  # its own stats: fp32 scores
                self.exchange_stats, self.loss_stats = self.exchange.stats, self.loss_exchange.stats
        for sender, receiver in self.mesh.stage_links():
            activations = dist.new_group([sender, receiver], timeout=timeout)
            gradients = dist.new_group([sender, receiver], timeout=timeout)
            if self.rank == sender:
                self.links.activations_out = Link(activations, receiver)
                self.links.gradients_in = Link(gradients, receiver)
            elif self.rank == receiver:
                self.links.activations_in = Link(activations, sender)
                self.links.gradients_out = Link(gradients, sender)
        if self.mesh.replicas > 1:
            for ranks in self.mesh.replica_groups():
                group = dist.new_group(ranks, timeout=timeout)
                if self.rank in ranks:
                    self.replica_group = group
            self._attach_sync()
        return backend

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # --- one step: the plan's schedule over this stage's microbatches

    def _run(self, plan: StepPlan, forward) -> StageRun:
        """Run this stage's actions of `plan`, transferring to and from the neighbouring stages."""
        m = plan.microbatches
        in_shape = out_shape = None
        towers_here = self.config.model_config.towers // self.mesh.towers
        if not self.first_stage:
            in_shape = boundary_shape(self.config.model_config, self.config.split, self.coord.stage - 1,
                                      plan.rows, towers_here)
        if not self.last_stage:
            out_shape = boundary_shape(self.config.model_config, self.config.split, self.coord.stage,
                                       plan.rows, towers_here)
        run = StageRun(plan, self.links, in_shape, out_shape, self.device, self.memory_format,
                       list(self.model.parameters()), dtype=self.precision.dtype)
        if plan.mode == "eval":
            actions = forward_actions(m)
        else:
            actions = stage_actions(plan.schedule, self.coord.stage, self.mesh.stages, m)
        run.run(actions, forward)
        return run

    def _stage_forward(self, x: Tensor) -> Tensor:
        """This stage's layers in the compute dtype (autocast); a last stage's logits come out in
        fp32, for the loss."""
        with self.precision.autocast():
            out = self.model(x, self.exchange) if self.mesh.towers == 2 else self.model(x)
        return out.float() if self.last_stage else out

    def _images(self, images: Tensor, lighting: Tensor | None, rows: int):
        """Stage 0's input of microbatch i: uint8 images, mean-subtracted with each image's PCA
        colour offset, as float32 on the device (cluster/rank/staging.py)."""
        return StagedBatch(images, lighting, rows, self.device, self.memory_format, self.pinned,
                           self.host_inputs).get

    def _check_labels(self, labels: Tensor) -> None:
        classes = self.config.num_classes
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(f"labels must be in [0, {classes}) for num_classes {classes}, got "
                             f"[{int(labels.min())}, {int(labels.max())}]: does --num-classes match the data?")

    def _gradients(self, plan: StepPlan, images: Tensor | None, labels: Tensor | None,
                   lighting: Tensor | None) -> tuple[StageRun, float, list[Tensor]]:
        """Forward and backward over the step's microbatches (gradients accumulate); returns the
        run, the batch's mean loss (last stage) and the last stage's logits per microbatch."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        read_images = self._images(images, lighting, plan.rows) if self.first_stage else None
        if self.last_stage:
            self._check_labels(labels)
            targets = labels.to(self.device).split(plan.rows)
        losses, logits = [], []
        if self.sync is not None:
            self.sync.start(plan.microbatches)

        def forward(i: int, x: Tensor | None) -> Tensor:
            out = self._stage_forward(read_images(i) if x is None else x)
            if not self.last_stage:
                return out
            loss = sharded_cross_entropy(out, targets[i], self.class_offset, self.loss_exchange)
            if self.coord.tower == 0 and faults.nan_at(plan.step):  # the rank that reports the loss
                loss = loss * float("nan")
            losses.append(loss.detach())
            logits.append(out.detach())
            # every microbatch is the same size: the batch loss is their mean
            share = tower_loss(loss, self.mesh.towers) / plan.microbatches
            return self.scaler.scale_loss(share) if self.scaler is not None else share

        run = self._run(plan, forward)
        if self.sync is not None:
            sync_start = time.time()
            self.sync.finish()
            run.timeline.add("allreduce", -1, sync_start)
        if faults.inf_gradient_at(self.rank, plan.step):
            grad = next(p for p in self.model.parameters() if p.grad is not None).grad
            grad[(0,) * grad.dim()] = float("inf")
        # the one host synchronisation of the step: the loss is read once, at its end
        loss = float(torch.stack(losses).sum()) / plan.microbatches if losses else float("nan")
        return run, loss, logits

    def train_step(self, plan: StepPlan, images: Tensor | None = None, labels: Tensor | None = None,
                   lighting: Tensor | None = None) -> StepReport:
        """One optimizer step on one batch: stage 0 gets the images (and lighting), the last stage
        the labels. Returns this actor's report of the step (its loss and hits at the last stage)."""
        start = time.perf_counter()
        if self.steps_done == self.failure_step:
            raise RuntimeError(f"failure injected by {faults.FAILURE_ENV} at rank {self.rank}, step {self.steps_done}")
        self.steps_done += 1
        if faults.hang_at(self.rank, plan.step):
            time.sleep(faults.HANG_S)
        self.exchange_stats.reset()
        self.loss_stats.reset()
        set_rates(self.optimizer, plan.group_rates)
        images, labels, lighting = map(from_object_store, (images, labels, lighting))
        run, loss, logits = self._gradients(plan, images, labels, lighting)
        optimizer_start = time.time()
        finite = True
        if self.scaler is not None:  # every rank agrees whether this step's gradients are finite
            finite = self.scaler.unscale(list(self.model.parameters()))
            self.scaler.update(finite)
        if finite:
            self.optimizer.step()
        run.timeline.add("optimizer", -1, optimizer_start)
        report = StepReport(**self.identity, images=plan.rows * plan.microbatches, seconds=time.perf_counter() - start,
                            exchange_s=self.exchange_stats.seconds + self.loss_stats.seconds,
                            exchange_bytes=self.exchange_stats.bytes_sent + self.loss_stats.bytes_sent,
                            exchange_dtypes=sorted(self.exchange_stats.dtypes), precision=self.precision.name,
                            skipped=not finite, loss_scale=self.scaler.scale if self.scaler is not None else None,
                            **run.totals(), **process_stats(self.device))
        if self.sync is not None:
            report.allreduce_exposed_s, report.allreduce_bytes = self.sync.exposed_s, self.sync.bytes
        if self.last_stage:  # the batch's top-1/top-5 hits for progress and metrics (no gradient, no RNG)
            report.loss = loss
            report.top1, report.top5 = sharded_topk_correct(torch.cat(logits), labels.to(self.device),
                                                            self.class_offset, self.loss_exchange)
        return report

    @torch.no_grad()
    def evaluate(self, plan: StepPlan, images: Tensor | None = None, labels: Tensor | None = None,
                 weights: Tensor | None = None) -> EvalScores | None:
        """Loss sum and top-1/top-5 hits over one validation batch, at the last stage (other
        stages return None).

        images: uint8 (b, 3, h, w), or (b, views, 3, h, w) for the paper's 10-view test, whose
        softmax is averaged over the views. weights (b,): 0 for padding rows, else 1."""
        self.model.eval()
        images, labels, weights = map(from_object_store, (images, labels, weights))
        scores: list[EvalScores] = []  # one per microbatch (last stage)
        views = self.config.eval_views
        if self.first_stage:
            read_images = self._images(images.flatten(0, 1) if images.dim() == 5 else images, None, plan.rows)
        if self.last_stage:
            self._check_labels(labels)
            per_microbatch = plan.rows // views
            targets = labels.to(self.device).split(per_microbatch)
            w = torch.ones(labels.shape[0]) if weights is None else weights
            row_weights = w.to(self.device, torch.float32).split(per_microbatch)

        def forward(i: int, x: Tensor | None) -> Tensor:
            out = self._stage_forward(read_images(i) if x is None else x)
            if self.last_stage:
                log_probs = sharded_view_average(out, views, self.loss_exchange)  # (b, classes held here)
                losses = -sharded_target_value(log_probs, targets[i], self.class_offset, self.loss_exchange)
                top1, top5 = sharded_topk_correct(log_probs, targets[i], self.class_offset, self.loss_exchange,
                                                  (1, 5), row_weights[i])
                scores.append(EvalScores(float((losses * row_weights[i]).sum()), top1, top5,
                                         float(row_weights[i].sum())))
            return out

        self._run(plan, forward)
        return sum(scores, EvalScores()) if self.last_stage else None

    # --- inspection (tests) and checkpoints

    def probe(self, plan: StepPlan, images: Tensor | None = None, labels: Tensor | None = None,
              lighting: Tensor | None = None) -> ProbeReport:
        """One step's loss, logits (last stage, microbatches concatenated) and this process's
        gradients, without an optimizer step, named as in the reference network
        (`towers.{t}.layers...`)."""
        images, labels, lighting = map(from_object_store, (images, labels, lighting))
        _, loss, logits = self._gradients(plan, images, labels, lighting)
        scale = self.scaler.scale if self.scaler is not None else 1.0  # fp16: the gradients of the loss itself
        grads = {self.reference_prefix + name: p.grad.detach().cpu() / scale
                 for name, p in self.model.named_parameters()}
        self.optimizer.zero_grad(set_to_none=True)
        return ProbeReport(**self.identity, loss=loss if self.last_stage else None,
                           logits=torch.cat(logits).cpu() if logits else None, grads=grads)

    def named_parameters(self) -> dict[str, Tensor]:
        return {self.reference_prefix + name: p.detach().cpu().clone()
                for name, p in self.model.named_parameters()}

    def check_storage(self, run_dir: str, token: str):
        """This actor's side of the run-dir check (cluster/ckpt/reach.py): it must read the driver's
        token in `run_dir` (a path or a URI, opened with this process's own credentials) and leave
        it back in a file of its own. Its `Answer`."""
        from cluster.ckpt import reach

        return reach.answer(run_dir, token, self.rank)

    def save(self, directory: str, asynchronous: bool = False) -> dict | None:
        """Write this rank's shard of checkpoint `directory` (a path or a URI) atomically
        (cluster/ckpt/storage.py) and return its manifest entry. `asynchronous`: copy the state now
        (the only stall) and write it in a thread while training goes on; `finish_save` returns
        the entry. Replicas other than 0 write only their coordinates and RNG state: their
        weights and momentum are replica 0's."""
        from cluster.ckpt import checkpoint, storage

        self.finish_save()  # one write at a time
        state = {checkpoint.SHARD_COORD: [self.coord.replica, self.coord.stage, self.coord.tower],
                 checkpoint.SHARD_RNG: torch.get_rng_state()}
        if self.scaler is not None:
            state[checkpoint.SHARD_SCALER] = self.scaler.state_dict()
        if self.coord.replica == 0:  # the other replicas hold the same weights and momentum
            state.update({checkpoint.SHARD_MODEL: self.model.state_dict(),
                          checkpoint.SHARD_OPTIMIZER: self.optimizer.state_dict()})
        path = storage.join(directory, checkpoint.shard_file(self.rank))
        if not asynchronous:
            return checkpoint.write_shard(path, _on_cpu(state, copy=False))
        self._writing = self._writer.submit(checkpoint.write_shard, path, _on_cpu(state, copy=True))
        return None

    def finish_save(self) -> dict | None:
        """Wait for the asynchronous shard write, if any; its manifest entry (or its error)."""
        writing, self._writing = self._writing, None
        return writing.result() if writing is not None else None

    def load_consolidated(self, consolidated: tuple[dict, dict]) -> None:
        """Take this actor's layers' weights and momentum from a whole network's (reference
        names; cluster/ckpt/consolidate.py `consolidate_with_momentum`): a checkpoint of another mesh shape."""
        state, momentum = consolidated
        names = [self.reference_prefix + key for key in self.model.state_dict()]
        self.model.load_state_dict({key: state[name] for key, name in zip(self.model.state_dict(), names)})
        self.optimizer.state.clear()
        for name, param in zip(names, self.model.parameters()):
            if name in momentum:
                self.optimizer.state[param]["velocity"] = momentum[name].to(param.device, param.dtype).clone()

    def load(self, directory: str) -> None:
        from cluster.ckpt import checkpoint

        state = checkpoint.load_shard(directory, checkpoint.shard_file(self.rank), map_location=self.device)
        coord = [self.coord.replica, self.coord.stage, self.coord.tower]
        if list(state[checkpoint.SHARD_COORD]) != coord:
            raise ValueError(f"shard {checkpoint.shard_file(self.rank)} belongs to (replica, stage, tower) "
                             f"{tuple(state[checkpoint.SHARD_COORD])}, not this rank's {tuple(coord)}")
        if self.coord.replica != 0:  # weights and momentum: replica 0's shard of this (stage, tower)
            source = self.mesh.rank(dataclasses.replace(self.coord, replica=0))
            weights = checkpoint.load_shard(directory, checkpoint.shard_file(source), map_location=self.device)
        else:
            weights = state
        self.model.load_state_dict(weights[checkpoint.SHARD_MODEL])
        self.optimizer.load_state_dict(weights[checkpoint.SHARD_OPTIMIZER])
        torch.set_rng_state(state[checkpoint.SHARD_RNG].cpu())  # the same dropout masks from here on
        if self.scaler is not None and checkpoint.SHARD_SCALER in state:  # an fp16 run's loss scale goes on
            self.scaler.load_state_dict(state[checkpoint.SHARD_SCALER])
