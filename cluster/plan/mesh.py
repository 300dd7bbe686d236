"""The actor mesh: replica × stage × tower, and every piece of rank arithmetic in the project.

A rank is one process (one Ray actor). Ranks are laid out tower-fastest, so the towers of one
(replica, stage) — the pair that exchanges activations at every cross-connection and so carries the
heaviest traffic — are neighbours:

    rank = (replica · stages + stage) · towers + tower

towers = 2 gives each half-tower its own process (the paper's layout); towers = 1 puts both halves
in one process with a local exchange (one GPU, or a pipeline benchmark on two cores).

A lane is the pipeline of one (replica, tower): its stages in order. Activations flow along a
lane, point to point; the towers of one stage exchange at the cross-connections. The replicas of
one (stage, tower) hold the same weights and all-reduce their gradients each step.
"""

from dataclasses import dataclass

from stages.tower import LAYERS

MAX_REPLICAS = 1024
SUPPORTED_STAGES = tuple(range(1, len(LAYERS) + 1))  # a stage holds one layer or more
SUPPORTED_TOWERS = (1, 2)


@dataclass(frozen=True)
class Coord:
    replica: int
    stage: int
    tower: int


@dataclass(frozen=True)
class Mesh:
    replicas: int = 1
    stages: int = 1
    towers: int = 2

    def __post_init__(self):
        if not 1 <= self.replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be in 1..{MAX_REPLICAS}, got {self.replicas}")
        for axis, value, allowed in (("stages", self.stages, SUPPORTED_STAGES),
                                     ("towers", self.towers, SUPPORTED_TOWERS)):
            if value not in allowed:
                reason = {"towers": ": the paper splits every layer across two towers, held by 2 processes or 1",
                          "stages": f": each stage holds at least one of the {len(LAYERS)} layers"}
                raise ValueError(f"{axis} must be one of {', '.join(map(str, allowed))}, got {value}"
                                 + reason[axis])

    @property
    def world_size(self) -> int:
        return self.replicas * self.stages * self.towers

    def describe(self) -> str:
        return (f"{self.replicas} replica(s) × {self.stages} stage(s) × {self.towers} tower process(es)"
                f" = {self.world_size} rank(s)")

    def rank(self, coord: Coord) -> int:
        for axis, value, size in (("replica", coord.replica, self.replicas),
                                  ("stage", coord.stage, self.stages),
                                  ("tower", coord.tower, self.towers)):
            if not 0 <= value < size:
                raise ValueError(f"{axis} {value} is outside the mesh's {size}")
        return (coord.replica * self.stages + coord.stage) * self.towers + coord.tower

    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the mesh's {self.world_size} ranks")
        replica_stage, tower = divmod(rank, self.towers)
        replica, stage = divmod(replica_stage, self.stages)
        return Coord(replica, stage, tower)

    def tower_group(self, replica: int, stage: int) -> list[int]:
        """Ranks that exchange activations with each other: the towers of one (replica, stage)."""
        return [self.rank(Coord(replica, stage, tower)) for tower in range(self.towers)]

    def tower_groups(self) -> list[list[int]]:
        return [self.tower_group(r, s) for r in range(self.replicas) for s in range(self.stages)]

    def lane(self, replica: int, tower: int) -> list[int]:
        """Ranks of one (replica, tower)'s stages, first to last: where activations flow."""
        return [self.rank(Coord(replica, stage, tower)) for stage in range(self.stages)]

    def loss_ranks(self) -> list[int]:
        """The rank reporting each replica's loss and scores: its last stage, tower 0."""
        return [self.lane(replica, 0)[-1] for replica in range(self.replicas)]

    def stage_links(self) -> list[tuple[int, int]]:
        """(stage s rank, stage s + 1 rank) for every boundary of every lane, in one fixed order
        (every rank must create the groups in the same order)."""
        return [(lane[s], lane[s + 1]) for r in range(self.replicas) for t in range(self.towers)
                for lane in [self.lane(r, t)] for s in range(self.stages - 1)]

    def replica_group(self, stage: int, tower: int) -> list[int]:
        """Ranks that all-reduce their gradients: one (stage, tower) in every replica."""
        return [self.rank(Coord(replica, stage, tower)) for replica in range(self.replicas)]

    def replica_groups(self) -> list[list[int]]:
        """Every (stage, tower)'s replica group, in one fixed order."""
        return [self.replica_group(s, t) for s in range(self.stages) for t in range(self.towers)]
