"""The 3D layout: tensor (tp) x pipeline (pp) x data (dp) parallel, and its process groups.

:class:`Layout` is pure Python: sizes, validation and the rank arithmetic, testable without
processes. :class:`ParallelGroups` is what one process builds from it once at start-up and
passes to whatever needs a group; nothing here is a module-level global.

Rank order follows DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model with
model innermost)::

    rank = stage * (dp * tp) + dp_rank * tp + tp_rank

so the tp ranks of one group are neighbours. Launchers place consecutive ranks on one node,
which keeps the chattiest groups (tensor parallel: several all-reduces per layer) on the
node's fast links; pipeline stages, which exchange one activation per micro-batch, are the
ones that cross nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


class LayoutError(ValueError):
    """The parallel sizes do not fit the world or the model."""


@dataclass(frozen=True)
class Coords:
    stage: int    # pipeline stage, 0 = embeddings
    dp_rank: int  # which replica of the model
    tp_rank: int  # which slice of each layer


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @classmethod
    def for_world(cls, tp: int, pp: int, world_size: int, ranks_per_node: Optional[int] = None) -> "Layout":
        """dp = world / (tp * pp), with errors that say which size to change."""
        for key, value in (("parallel.tp", tp), ("parallel.pp", pp)):
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"{key} must be a positive integer; got {value!r}")
        if world_size % (tp * pp):
            raise LayoutError(f"world size {world_size} is not divisible by parallel.tp x parallel.pp = "
                              f"{tp} x {pp}; start a multiple of {tp * pp} processes")
        if ranks_per_node and tp > 1 and ranks_per_node % tp:
            raise LayoutError(f"parallel.tp={tp} does not divide the {ranks_per_node} processes per node: "
                              f"a tensor-parallel group would span two nodes, and its all-reduces (several "
                              f"per layer) would cross the network. Use a tp that divides {ranks_per_node}")
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> Coords:
        return Coords(stage=rank // (self.dp * self.tp), dp_rank=(rank // self.tp) % self.dp, tp_rank=rank % self.tp)

    def rank_of(self, stage: int, dp_rank: int, tp_rank: int) -> int:
        return stage * self.dp * self.tp + dp_rank * self.tp + tp_rank

    def tp_ranks(self, rank: int) -> list[int]:
        c = self.coords(rank)
        return [self.rank_of(c.stage, c.dp_rank, t) for t in range(self.tp)]

    def dp_ranks(self, rank: int) -> list[int]:
        c = self.coords(rank)
        return [self.rank_of(c.stage, d, c.tp_rank) for d in range(self.dp)]

    def pp_ranks(self, rank: int) -> list[int]:
        c = self.coords(rank)
        return [self.rank_of(s, c.dp_rank, c.tp_rank) for s in range(self.pp)]

    def describe(self) -> str:
        return f"tp {self.tp} x pp {self.pp} x dp {self.dp} = {self.world_size} ranks"


def check_model_split(layout: Layout, *, n_heads: int, n_kv_heads: int, vocab_size: int, n_layers: int,
                      mlp_hidden: int, uniform_stages: bool) -> None:
    """Everything tensor parallelism cuts must divide by tp, and every stage needs a layer."""
    tp, pp = layout.tp, layout.pp
    for key, value in (("model.n_heads", n_heads), ("model.n_kv_heads", n_kv_heads),
                       ("the MLP width (model.d_ff)", mlp_hidden)):
        if value % tp:
            raise LayoutError(f"{key}={value} is not divisible by parallel.tp={tp}: each tensor-parallel rank "
                              f"holds an equal share of it")
    if vocab_size % tp:
        bigger = -(-vocab_size // tp) * tp
        raise LayoutError(f"model.vocab_size={vocab_size} is not divisible by parallel.tp={tp}; set "
                          f"model.vocab_size={bigger} (ids past the tokenizer's are never seen, and a multiple "
                          f"of 64 or 128 also tiles better on GPUs)")
    if n_layers < pp:
        raise LayoutError(f"model.n_layers={n_layers} is fewer than parallel.pp={pp} stages")
    if uniform_stages and n_layers % pp:
        raise LayoutError(f"model.n_layers={n_layers} is not divisible by parallel.pp={pp}, which "
                          f"parallel.pipeline_partition=uniform needs; use a divisor or 'parameters'")


def ranks_per_node_from_env(env: Optional[dict] = None) -> Optional[int]:
    """Processes per node, when the launcher says (torchrun, SLURM, Open MPI); else None."""
    env = os.environ if env is None else env
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if env.get(name, "").isdigit():
            return int(env[name])
    tasks = env.get("SLURM_NTASKS_PER_NODE", "")
    return int(tasks) if tasks.isdigit() else None


class ParallelGroups:
    """This process's groups, built once. Collective: every rank constructs it in the same order.

    Built on DeepSpeed's ``PipelineParallelGrid``, which is also DeepSpeed's ``mpu`` interface
    (``get_data_parallel_group``, ``get_model_parallel_group``, ...): ZeRO partitions over the
    data-parallel group and counts tensor-parallel slices once in the gradient norm through it.
    """

    def __init__(self, layout: Layout, rank: int):
        from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

        self.layout = layout
        self.rank = rank
        self.coords = layout.coords(rank)
        self.topology = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
        self._check_same_order()
        # Plain data parallelism needs no group but the world (and a grid would make
        # world_size + a few more of them).
        self.grid = PipelineParallelGrid(topology=self.topology) if layout.tp * layout.pp > 1 else None

    def _check_same_order(self) -> None:
        # Our rank arithmetic and DeepSpeed's must agree, or the groups we log are not the ones used.
        c = self.topology.get_coord(self.rank)
        if (c.pipe, c.data, c.model) != (self.coords.stage, self.coords.dp_rank, self.coords.tp_rank):
            raise RuntimeError(f"rank {self.rank}: DeepSpeed places it at {c}, distlm at {self.coords}")

    @property
    def tp_group(self):
        return self.grid.get_slice_parallel_group() if self.layout.tp > 1 else None

    @property
    def replica_group(self):
        """The tp x pp ranks that hold one copy of the model (None: a single rank)."""
        return self.grid.get_model_parallel_group() if self.layout.tp * self.layout.pp > 1 else None

    @property
    def mpu(self):
        """What ``deepspeed.initialize(mpu=...)`` needs when tp > 1 (pp > 1 brings its own grid)."""
        return self.grid if self.layout.tp > 1 and self.layout.pp == 1 else None

    def tp(self, sequence_parallel: bool = False):
        from distlm.parallel.tensor import TPGroup

        if self.layout.tp == 1:
            return TPGroup.single()
        return TPGroup(group=self.tp_group, size=self.layout.tp, rank=self.coords.tp_rank,
                       sequence_parallel=sequence_parallel)

    def category(self, ranks: tuple[int, ...]) -> str:
        """Name a group by its ranks, for the communication report: tp, dp, pp or other."""
        ranks = tuple(sorted(ranks))
        if len(ranks) <= 1:
            return "local"
        for name, members in (("tp", self.layout.tp_ranks(self.rank)), ("dp", self.layout.dp_ranks(self.rank)),
                              ("pp", self.layout.pp_ranks(self.rank))):
            if ranks == tuple(sorted(members)):
                return name
        if all(r in self.layout.pp_ranks(self.rank) for r in ranks):
            return "pp"  # a pair of stages: point-to-point, or the tied embedding's first/last group
        return "other"
