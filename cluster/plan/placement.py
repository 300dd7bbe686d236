"""Where the mesh's actors run, as a plan: one placement group per replica, one bundle per stage.

A stage's bundle holds both of its tower actors, so the two towers of a stage — the pair that
exchanges activations at every cross-connection, the heaviest traffic of the mesh — always share a
node. The plan (`plan_placement`, a pure function of the nodes' free resources) packs the stages
of a replica onto as few nodes as fit and spreads the replicas over nodes (each replica starts on
the node hosting the fewest replicas so far, the one with the most free capacity first). Every
bundle is pinned to its planned node with a `ray.io/node-id` label selector, so Ray holds exactly
the plan. `--stage-resources 0=ssd` restricts a stage to nodes that offer the custom resource.

When the cluster cannot hold the plan the error says, per node, what is wanted and what is free.
Pure: the nodes come in as values; cluster/launch/placement_groups.py asks Ray for them and
reserves the plan, and cluster/plan/scaling.py uses the same rule for its meshes.
"""

import dataclasses

from cluster.plan.mesh import Coord, Mesh

NODE_ID_LABEL = "ray.io/node-id"
PIN_AMOUNT = 0.01  # of a --stage-resources resource, per stage
MAX_AUTO_LOADERS = 16  # loaders per replica that `auto_loaders` gives at most


class PlacementError(RuntimeError):
    """The cluster cannot hold (or did not start) the mesh's actors."""


@dataclasses.dataclass(frozen=True)
class Node:
    node_id: str
    address: str
    free: dict  # resource name → amount available (now, or in all)


def actor_resources(mesh: Mesh, threads_per_worker: int, nodes: list[Node]) -> dict:
    """Resources of one actor: a GPU each when the cluster has one per rank, else CPU threads."""
    gpus = sum(n.free.get("GPU", 0) for n in nodes)
    if gpus >= mesh.world_size:
        return {"CPU": 1, "GPU": 1}
    return {"CPU": threads_per_worker}


def stage_bundle(mesh: Mesh, per_actor: dict, stage: int, resource: str | None, loader_cpus: float = 0) -> dict:
    """Stage `stage` of one replica: every tower's actor, the stage's pinning resource, and at
    stage 0 the CPUs of the replica's loader actors (they run where the images go)."""
    bundle = {name: amount * mesh.towers for name, amount in per_actor.items()}
    if loader_cpus and stage == 0:
        bundle["CPU"] = bundle.get("CPU", 0) + loader_cpus
    if resource:
        bundle[resource] = PIN_AMOUNT
    return bundle


def auto_loaders(mesh: Mesh, per_actor: dict, threads: int, nodes: list[Node]) -> int:
    """Loader actors per replica that the nodes' spare CPUs keep busy: on GPU actors, the CPUs a
    GPU node has beyond its actors', shared by the replicas it hosts, `threads` per loader (at
    least 1, at most MAX_AUTO_LOADERS); on CPU actors 1, since their cores train."""
    if "GPU" not in per_actor or not nodes:
        return 1
    node = max(nodes, key=lambda n: (n.free.get("GPU", 0), n.free.get("CPU", 0)))
    actors_here = min(int(node.free.get("GPU", 0)), mesh.world_size)
    replicas_here = max(1, actors_here // (mesh.stages * mesh.towers))
    spare = node.free.get("CPU", 0) - actors_here * per_actor.get("CPU", 0)
    return max(1, min(MAX_AUTO_LOADERS, int(spare // (replicas_here * threads))))


def _fits(want: dict, free: dict) -> bool:
    return all(free.get(name, 0) >= amount - 1e-9 for name, amount in want.items())


def plan_placement(mesh: Mesh, per_actor: dict, nodes: list[Node], pinned: dict[int, str] | None = None,
                   view: str = "free", loader_cpus: float = 0) -> list[list[Node]]:
    """The node of every (replica, stage): `plan[replica][stage]`; each replica's stage 0 also
    holds `loader_cpus` for its loader actors. Raises PlacementError naming the first bundle that
    fits nowhere, what it wants and what each node has (`view`: what the nodes' resources are,
    "free" or "in all")."""
    pinned = pinned or {}
    free = {n.node_id: dict(n.free) for n in nodes}
    hosted = {n.node_id: 0 for n in nodes}  # replicas with a stage on the node
    main = "GPU" if "GPU" in per_actor else "CPU"
    plan = []
    for replica in range(mesh.replicas):
        order = sorted(nodes, key=lambda n: (hosted[n.node_id], -free[n.node_id].get(main, 0), n.node_id))
        stages: list[Node] = []
        for stage in range(mesh.stages):
            want = stage_bundle(mesh, per_actor, stage, pinned.get(stage), loader_cpus)
            candidates = stages[-1:] + order  # pack: stay on the previous stage's node while it fits
            node = next((n for n in candidates if _fits(want, free[n.node_id])), None)
            if node is None:
                have = "; ".join(f"{n.address} {n.node_id[:8]}: {format_resources(free[n.node_id])}" for n in nodes)
                raise PlacementError(
                    f"replica {replica} stage {stage} needs {format_resources(want)} on one node (its {mesh.towers} tower "
                    f"actor(s) together{' and its loaders' if stage == 0 and loader_cpus else ''}) and no node has it "
                    f"{view} ({have or 'no nodes'}): add nodes, lower --threads-per-worker, --replicas or "
                    f"--loaders-per-replica, or check --stage-resources")
            for name, amount in want.items():
                free[node.node_id][name] -= amount
            stages.append(node)
        for node_id in {n.node_id for n in stages}:
            hosted[node_id] += 1
        plan.append(stages)
    return plan


def format_resources(resources: dict) -> str:
    shown = {k: v for k, v in resources.items()
             if not k.startswith("node:") and "_group_" not in k and k not in ("memory", "object_store_memory")
             and v > 0}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def format_placement(mesh: Mesh, where: list[dict], per_actor: dict, loaders: list[list[dict]] = (),
                     loader_cpus: float = 0) -> str:
    """The placement table: one row per tower actor (its coordinates, node, GPUs, CPUs, process),
    then one per loader actor, ranked `L<replica>.<loader>` (they run on their replica's stage 0)."""
    rows = [("rank", "replica", "stage", "tower", "node", "address", "GPU", "CPUs", "pid")]
    for rank, place in enumerate(where):
        coord: Coord = mesh.coord(rank)
        rows.append((str(rank), str(coord.replica), str(coord.stage), str(coord.tower), place["node_id"][:12],
                     place["address"], ",".join(map(str, place["gpus"])) or "-", f"{per_actor.get('CPU', 0):g}",
                     str(place["pid"])))
    for replica, places in enumerate(loaders):
        for k, place in enumerate(places):
            rows.append((f"L{replica}.{k}", str(replica), "0", "-", place["node_id"][:12], place["address"], "-",
                         f"{loader_cpus:g}", str(place["pid"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
