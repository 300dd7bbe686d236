"""Scaling benchmark: what data parallelism costs here, measured, and what the scaling model
(cluster/plan/scaling.py, docs/SCALING.md) predicts for GPU clusters.

(a) Measured on this machine, in one run, with the repetitions interleaved. Three meshes of the
    paper's network (both towers in each actor, towers = 1; one stage), each on the same cores and
    the same global batch of 2B images:

      R=1            one actor with 2 threads on 2B images: the baseline (same cores, same batch);
      R=2            two actors of 1 thread, B images each, gradients averaged by the bucketed
                     all-reduce overlapped with backward (cluster/rank/gradsync.py);
      R=2 no overlap the same, every bucket reduced after the backward (--overlap-allreduce off).

    Per step: wall time (median), the all-reduce's exposed seconds (`allreduce_exposed_s`, the
    slower replica) and bytes (`allreduce_bytes`), so: the ratio of R=2's images/s to R=1's, the
    all-reduce overhead in seconds and as a share of R=2's step, and the overlap,
    1 − exposed with overlap / exposed without. The no-overlap run also gives the loopback
    all-reduce's effective bandwidth, from which the model predicts the overlapped exposure
    (with per-layer times measured here at B images, one thread); the two are printed side by side.

(b) The model's tables: the best mesh (R, S, towers, M, split) for N GPUs on M nodes at 100 and
    400 Gb/s per node, against the one weird trick, at a global batch; the full ranking and the
    traffic per link for 8 GPUs/node × 4 nodes; the sensitivity to the assumed GPU rate, to bf16
    gradients and to the global batch. `--markdown` prints them as docs/SCALING.md's tables.

Run from the repository root, alone on the machine (a few minutes on 2 cores; the three meshes
stay alive, 5 actors of roughly 2 GB each at B = 64: weights, gradients and momentum are 0.7 GB):

    .venv/bin/python bench/scaling.py [--batch-size 64] [--image-size 224] [--steps 3] [--warmup 1] [--json PATH]
    .venv/bin/python bench/scaling.py --model-only [--markdown] [--global-batch 1024]
    .venv/bin/python bench/scaling.py --quick      # smoke run: 63×63, B = 8, 1 step

"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from cluster.plan import scaling as sc  # noqa: E402
from stages.split import layer_times  # noqa: E402
from stages.tower import LAYERS  # noqa: E402

CLUSTERS = ((2, 1), (8, 1), (16, 2), (32, 4), (64, 8))  # (GPUs, nodes)
FOCUS = (32, 4)  # 8 GPUs/node × 4 nodes


# --- (a) the measurement

def measure(args) -> dict:
    from cluster.launch.actor_mesh import ActorMesh
    from cluster.launch.session import ray_session
    from cluster.config import TrainConfig

    b = args.batch_size
    base = TrainConfig(recipe="bench", num_classes=args.num_classes, image_size=args.image_size,
                       resize=args.image_size, dropout=0.0, batch_size=b, lr=0.001, train_data="unused",
                       val_data="unused", towers=1, stages=1, stage_split="conv1-fc8", threads_per_worker=1)
    configs = {
        "R=1": base.replace(replicas=1, batch_size=2 * b, threads_per_worker=2),
        "R=2": base.replace(replicas=2, overlap_allreduce="on"),
        "R=2 no overlap": base.replace(replicas=2, overlap_allreduce="off"),
    }
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2 * b, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, args.num_classes, (2 * b,), generator=g)
    halves = [images[r::2].contiguous() for r in range(2)], [labels[r::2].contiguous() for r in range(2)]

    print(f"measuring per-layer times at {b} images, 1 thread (for the model's check) ...", flush=True)
    times = layer_times(base.model_config, b, threads=1, repeats=1)

    rows = {name: {"step_s": [], "exposed_s": [], "bytes": 0, "compute_s": []} for name in configs}
    with ray_session(cpus_wanted=2 * len(configs), dashboard=False, actor_logs=False):  # or this process's Ray
        meshes = {}
        try:
            for name, config in configs.items():
                meshes[name] = ActorMesh(config)
            inputs = {"R=1": (meshes["R=1"].put(images), meshes["R=1"].put(labels))}
            refs = tuple([meshes["R=2"].put(x) for x in part] for part in halves)
            inputs["R=2"] = inputs["R=2 no overlap"] = refs
            order = list(configs)
            for i in range(args.warmup + args.steps):
                for name in order[i % len(order):] + order[:i % len(order)]:  # rotate who goes first
                    start = time.perf_counter()
                    reports = meshes[name].train_step(*inputs[name], 0.001)
                    elapsed = time.perf_counter() - start
                    if i < args.warmup:
                        continue
                    row = rows[name]
                    row["step_s"].append(elapsed)
                    row["exposed_s"].append(max(r.allreduce_exposed_s for r in reports))
                    row["bytes"] = max(r.allreduce_bytes for r in reports)
                    row["compute_s"].append(max(r.compute_s for r in reports))
                print(f"  round {i + 1}/{args.warmup + args.steps} done", flush=True)
        finally:
            for workers in meshes.values():
                workers.shutdown()

    result = {"config": {"batch_per_replica": b, "global_batch": 2 * b, "image_size": args.image_size,
                         "num_classes": args.num_classes, "steps": args.steps, "warmup": args.warmup},
              "layer_times_s": times}
    for name, row in rows.items():
        result[name] = {"step_s": statistics.median(row["step_s"]), "steps_s": row["step_s"],
                        "allreduce_exposed_s": statistics.median(row["exposed_s"]),
                        "allreduce_bytes": row["bytes"], "compute_s": statistics.median(row["compute_s"]),
                        "images_s": 2 * b / statistics.median(row["step_s"])}
    one, two, flat = result["R=1"], result["R=2"], result["R=2 no overlap"]
    result["ratio_R2_R1"] = two["images_s"] / one["images_s"]
    result["allreduce_overhead_s"] = two["allreduce_exposed_s"]
    result["allreduce_overhead_fraction"] = two["allreduce_exposed_s"] / two["step_s"]
    result["step_overhead_s"] = two["step_s"] - one["step_s"]
    result["overlap"] = 1 - two["allreduce_exposed_s"] / flat["allreduce_exposed_s"] if flat["allreduce_exposed_s"] else 0.0
    # the model's check: loopback bandwidth from the unoverlapped reduction (R = 2: the ring sends
    # 2·(R − 1)/R = 1 × the bytes), per-layer times from here; what does it predict with overlap?
    bandwidth = flat["allreduce_bytes"] / flat["allreduce_exposed_s"] if flat["allreduce_exposed_s"] else float("inf")
    net = sc.network(base.model_config)
    links = sc.Links(bandwidth, 0.0, bandwidth, 0.0, "loopback (measured)")
    measured = sc.Measured(times, rows=b)
    predicted = {overlap: sc.mesh_step(net, measured, sc.Cluster(1, 2, links), 2, 1, 1, 1, b, (LAYERS,),
                                       overlap=overlap) for overlap in (True, False)}
    result["model"] = {"loopback_bytes_s": bandwidth,
                       "exposed_s": predicted[True].allreduce_exposed_s,
                       "exposed_no_overlap_s": predicted[False].allreduce_exposed_s,
                       "overlap": 1 - predicted[True].allreduce_exposed_s / predicted[False].allreduce_exposed_s
                       if predicted[False].allreduce_exposed_s else 0.0,
                       "compute_s": predicted[True].compute_s}
    return result


def print_measurement(res: dict) -> None:
    c = res["config"]
    print(f"\n(a) measured: global batch {c['global_batch']} of {c['image_size']}×{c['image_size']}, "
          f"{c['num_classes']} classes, towers = 1, median of {c['steps']} interleaved steps")
    print(f"{'mesh':16} | {'step s':>7} | {'img/s':>6} | {'compute s':>9} | {'all-reduce exposed s':>20} | {'MB reduced':>10}")
    for name in ("R=1", "R=2", "R=2 no overlap"):
        r = res[name]
        print(f"{name:16} | {r['step_s']:7.3f} | {r['images_s']:6.1f} | {r['compute_s']:9.3f} | "
              f"{r['allreduce_exposed_s']:20.3f} | {r['allreduce_bytes'] / 1e6:10.1f}")
    print(f"R=2 / R=1 images/s: {res['ratio_R2_R1']:.2f}; R=2 step − R=1 step: {res['step_overhead_s']:+.3f} s "
          f"({100 * res['step_overhead_s'] / res['R=2']['step_s']:+.1f}% of R=2's step)")
    print(f"all-reduce overhead per step: {res['allreduce_overhead_s']:.3f} s = "
          f"{100 * res['allreduce_overhead_fraction']:.1f}% of R=2's step")
    print(f"overlap: 1 − exposed with / without = {100 * res['overlap']:.0f}%")
    m = res["model"]
    print(f"model check: loopback all-reduce {m['loopback_bytes_s'] / 1e9:.2f} GB/s (from the unoverlapped run); "
          f"with the per-layer times measured here the model predicts {m['exposed_s']:.3f} s exposed "
          f"({100 * m['overlap']:.0f}% overlap) against {res['allreduce_overhead_s']:.3f} s measured "
          f"(the model leaves out the all-reduce's own CPU use, which competes with backward on these 2 cores)")


# --- (b) the model

def model_tables(args) -> dict:
    net = sc.network()
    device = sc.H100_TF32
    batch = args.global_batch
    out = {"device": device.name, "device_source": device.source, "global_batch": batch, "rows": [],
           "focus": {}, "sensitivity": []}
    one_gpu = sc.rank_meshes(net, device, sc.cluster(1, 1, sc.gpu_links(100)), batch)[0]
    out["one_gpu_images_s"] = one_gpu.images_s
    for gbit in args.gbits:
        for gpus, nodes in CLUSTERS:
            where = sc.cluster(gpus, nodes, sc.gpu_links(gbit))
            ranked = sc.rank_meshes(net, device, where, batch)
            owt = sc.owt_step(net, device, where, batch)
            node = sc.rank_meshes(net, device, sc.cluster(gpus // nodes, 1, sc.gpu_links(gbit)), batch)[0]
            out["rows"].append({"gpus": gpus, "nodes": nodes, "gbit": gbit, "best": ranked[0], "owt": owt,
                                "one_node": node, "input": input_rows(ranked[0], where)})
    gpus, nodes = FOCUS
    for gbit in args.gbits:
        where = sc.cluster(gpus, nodes, sc.gpu_links(gbit))
        out["focus"][gbit] = {"ranked": sc.rank_meshes(net, device, where, batch),
                              "owt": sc.owt_step(net, device, where, batch)}
    variants = [("as above", device, 4, batch), ("GPU rate ×0.5", device.with_flops(0.5), 4, batch),
                ("GPU rate ×2", device.with_flops(2.0), 4, batch), ("bf16 gradients", device, 2, batch),
                ("global batch 128", device, 4, 128), ("global batch 4096", device, 4, 4096)]
    for label, dev, grad_bytes, gb in variants:
        for gbit in args.gbits:
            where = sc.cluster(gpus, nodes, sc.gpu_links(gbit))
            best = sc.rank_meshes(net, dev, where, gb, grad_bytes=grad_bytes)[0]
            owt = sc.owt_step(net, dev, where, gb, grad_bytes=grad_bytes)
            node = sc.rank_meshes(net, dev, sc.cluster(gpus // nodes, 1, sc.gpu_links(gbit)), gb,
                                  grad_bytes=grad_bytes)[0]
            out["sensitivity"].append({"variant": label, "gbit": gbit, "best": best, "owt": owt, "one_node": node})
    return out


def input_rows(est: sc.Estimate, where: sc.Cluster) -> dict:
    """The input path of a recommended mesh: per kind of shards, the images/s its loaders can
    make and the cores each GPU needs; the bytes a step puts in the object store and on the NIC."""
    found = {"bytes": sc.input_bytes(est.batch), "paths": {}}
    for path in sc.INPUT_PATHS:
        found["paths"][path.name] = {"input_images_s": sc.input_bound_images_s(est, where, path),
                                     "cores_per_gpu": sc.cores_per_gpu(est, path)}
    return found


def _split(est: sc.Estimate, markdown: bool) -> str:
    return (" \\| " if markdown else " | ").join(s[0] if len(s) == 1 else f"{s[0]}-{s[-1]}" for s in est.split)


def _ms(x: float) -> str:
    return f"{1e3 * x:.2f}"


def print_model(out: dict, markdown: bool) -> None:
    bar = "|" if markdown else " "

    def row(*cells):
        line = f" {bar} ".join(str(c) for c in cells)
        print(f"{bar} {line} {bar}" if markdown else line)

    def rule(n):
        if markdown:
            print("|" + "---|" * n)

    print(f"\n(b) model: {out['device']}, NVLink 360 GB/s inside a node, global batch {out['global_batch']}, "
          f"fp32 activations and gradients; one GPU alone: {out['one_gpu_images_s']:.0f} img/s\n")
    row("GPUs/nodes", "Gb/s per node", "best mesh", "split", "img/s", "step ms", "all-reduce exposed ms",
        "OWT img/s", "OWT / best", "one node alone img/s")
    rule(10)
    for r in out["rows"]:
        best, owt, node = r["best"], r["owt"], r["one_node"]
        row(f"{r['gpus']}/{r['nodes']}", r["gbit"], best.shape(), _split(best, markdown), f"{best.images_s:.0f}",
            _ms(best.step_s), _ms(best.allreduce_exposed_s), f"{owt.images_s:.0f}",
            f"{owt.images_s / best.images_s:.2f}", f"{node.images_s:.0f}")
    print(f"\nThe input path of each best mesh: loaders on each replica's stage-0 node, "
          f"{sc.CORES_PER_NODE} cores per node less one per GPU actor; decode per core "
          + ", ".join(f"{p.decode_images_s_per_core:.0f} img/s ({p.name})" for p in sc.INPUT_PATHS) + "\n")
    names = [p.name for p in sc.INPUT_PATHS]
    row("GPUs/nodes", "Gb/s per node", "best mesh", "compute-bound img/s",
        *(f"input-bound img/s, {n}" for n in names), *(f"cores per GPU, {n}" for n in names),
        "object store MB/step/replica", "NIC B/step/replica", "bound by")
    rule(7 + 2 * len(names))
    for r in out["rows"]:
        best, paths = r["best"], r["input"]["paths"]
        inputs = [paths[n]["input_images_s"] for n in names]
        bound = ", ".join(f"{'input' if rate < best.images_s else 'compute'} ({n})" for n, rate in zip(names, inputs))
        row(f"{r['gpus']}/{r['nodes']}", r["gbit"], best.shape(), f"{best.images_s:.0f}",
            *(f"{rate:.0f}" for rate in inputs), *(f"{paths[n]['cores_per_gpu']:.1f}" for n in names),
            f"{r['input']['bytes']['object_store'] / 1e6:.1f}", f"{r['input']['bytes']['nic']}", bound)
    gpus, nodes = FOCUS
    for gbit, focus in out["focus"].items():
        print(f"\n{gpus // nodes} GPUs/node × {nodes} nodes at {gbit} Gb/s per node: every mesh, best first "
              f"(ms per step)\n")
        row("mesh", "B/replica", "split", "img/s", "step", "compute", "bubble", "exchange", "p2p (link)",
            "all-reduce (link)", "exposed", "optimizer")
        rule(12)
        for est in focus["ranked"] + [focus["owt"]]:
            ex, p2p, ar = est.traffic[0], est.traffic[-2] if est.scheme == "mesh" else None, est.traffic[-1]
            row(est.shape() + (" (all-gathers in 'exchange')" if est.scheme != "mesh" else ""), est.batch,
                _split(est, markdown), f"{est.images_s:.0f}", _ms(est.step_s), _ms(est.compute_s),
                f"{100 * est.bubble:.0f}%", f"{_ms(est.exchange_s)} ({ex.link}, {ex.bytes_per_gpu / 1e6:.0f} MB)",
                f"{_ms(est.p2p_s)} ({p2p.link})" if p2p else "-",
                f"{_ms(est.allreduce_s)} ({ar.link}, {ar.bytes_per_gpu / 1e6:.0f} MB)",
                _ms(est.allreduce_exposed_s), _ms(est.optimizer_s))
    print(f"\nSensitivity, {gpus} GPUs on {nodes} nodes (img/s)\n")
    row("variant", "Gb/s", "best mesh", "img/s", "OWT img/s", "one node alone img/s")
    rule(6)
    for r in out["sensitivity"]:
        row(r["variant"], r["gbit"], r["best"].shape(), f"{r['best'].images_s:.0f}", f"{r['owt'].images_s:.0f}",
            f"{r['one_node'].images_s:.0f}")


def _jsonable(value):
    if isinstance(value, sc.Estimate):
        return {"shape": value.shape(), "split": [list(s) for s in value.split], "images_s": value.images_s,
                "step_s": value.step_s, "compute_s": value.compute_s, "bubble": value.bubble,
                "exchange_s": value.exchange_s, "p2p_s": value.p2p_s, "allreduce_s": value.allreduce_s,
                "allreduce_exposed_s": value.allreduce_exposed_s, "optimizer_s": value.optimizer_s,
                "traffic": [vars(t) for t in value.traffic]}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64, help="images per replica for R=2 (R=1 takes twice)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each mesh, interleaved")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 63×63 images, batch 8, 1 timed step")
    parser.add_argument("--model-only", action="store_true", help="only the model's tables (b)")
    parser.add_argument("--markdown", action="store_true", help="print the model's tables as Markdown")
    parser.add_argument("--global-batch", type=int, default=1024, help="global batch of the model's tables")
    parser.add_argument("--gbits", type=float, nargs="+", default=[100, 400], help="inter-node Gb/s per node")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.batch_size, args.steps, args.warmup = 63, 8, 1, 1
    args.gbits = [int(g) if g == int(g) else g for g in args.gbits]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    results = {}
    if not args.model_only:
        results["measured"] = measure(args)
        print_measurement(results["measured"])
    results["model"] = model_tables(args)
    print_model(results["model"], args.markdown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_jsonable(results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
