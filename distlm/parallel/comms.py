"""Communication accounting: what each collective moves, and what a layout must move at least.

Two halves:

* :class:`CommsCounter` *measures*. While active it replaces torch.distributed's Python
  collectives with counting wrappers, so every call made through them - by our code or by
  DeepSpeed - is recorded as calls, payload bytes and wire bytes per (category, op). Stopping
  it puts the original functions back (no overhead afterwards).
* :func:`minimum_bytes` *predicts*: the wire bytes per optimizer step that a (tp, pp, dp, ZeRO)
  layout cannot avoid, from the model's shape alone (pure Python, no process group needed).

:func:`report_lines` puts the two side by side.

Byte convention (the NCCL-tests "bus bandwidth" view)
-----------------------------------------------------
``payload_bytes`` S is the size of the logical buffer: the tensor for all-reduce / reduce /
broadcast / send / recv, the *output* (the full gathered tensor) for all-gather, the *input*
(the full unreduced tensor) for reduce-scatter, the input for all-to-all. Object collectives
(``all_gather_object``, ``broadcast_object_list``, ...) and barriers count calls with S = 0:
their pickled size is not known up front and they are not on the training path.

``wire_bytes`` is what *this rank* sends under a bandwidth-optimal algorithm on a group of n
ranks; summed over ranks it is the traffic the collective needs at least:

===========================  ==================  ==============================================
op                           wire bytes / rank   why
===========================  ==================  ==============================================
reduce-scatter               (n-1)/n * S         each rank must receive n-1 foreign shards of S/n
all-gather                   (n-1)/n * S         each rank must receive the n-1 shards it lacks
all-reduce                   2(n-1)/n * S        = reduce-scatter + all-gather
reduce, broadcast            (n-1)/n * S         (n-1)*S in total spread over the n ranks
all-to-all                   (n-1)/n * S         all but the own 1/n leaves the rank
send / isend                 S                   point to point
recv / irecv                 0                   the sender pays
gather (to dst)              S/n on non-dst      each contributes its own piece; dst sends 0
scatter (from src)           (n-1)/n * S on src  src sends every other piece; others send 0
n == 1                       0                   nothing leaves the rank
===========================  ==================  ==============================================

The reduce / broadcast / all-to-all figures are per-rank averages of the total; send, recv,
gather and scatter are charged to the rank that really sends.

What is patched (and what is not)
---------------------------------
DeepSpeed's ``deepspeed.comm`` TorchBackend looks its collectives up as ``torch.distributed.<op>``
at call time, except for three things, all handled here:

* ``TorchBackend.__init__`` stores ``torch.distributed.all_gather_into_tensor`` and
  ``torch.distributed.reduce_scatter_tensor`` as *instance attributes*
  (``cdb.all_gather_function`` / ``cdb.reduce_scatter_function``): the counter patches those
  attributes of the live ``deepspeed.comm.comm.cdb`` object too.
* ``all_gather_base`` and ``all_gather_coalesced`` call
  ``torch.distributed.distributed_c10d._all_gather_base`` / ``.all_gather_into_tensor``:
  ``distributed_c10d`` is patched as well.
* Any module of ``deepspeed`` or ``distlm`` that imported a collective by name
  (``from torch.distributed import all_reduce``) gets its alias patched.

Inside ``distributed_c10d`` five names are left alone: ``all_reduce``, ``all_gather_single``,
``reduce_scatter_single``, ``isend``, ``irecv``. torch compares them *by identity* (the
coalescing manager's fast path, ``batch_isend_irecv``'s send/receive test), so replacing them
there could break a coalescing block or a ``P2POp`` that straddles start/stop. The public
``torch.distributed.<name>`` of each is patched, and that is what callers use. A ``P2POp``
built with a wrapped ``isend`` passes torch's check (wrappers compare equal to the function
they wrap) and is handed to torch with the original function by the ``batch_isend_irecv``
wrapper. (Building a ``P2POp`` while counting and running it with ``batch_isend_irecv`` after
stopping is the one unsupported mix.)

Only the outermost call counts: the object collectives, ``send``/``recv`` and the deprecated
aliases call other collectives inside, and a per-thread depth guard skips those.

Not seen: anything that bypasses the Python functions - DDP's C++ reducer, functional
collectives (``torch.distributed._functional_collectives``), NCCL calls from custom kernels.
"""

from __future__ import annotations

import functools
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch

MB = 1e6  # report unit: 1 MB = 10^6 bytes

# op name -> how the payload and the per-rank wire bytes are found (see _measure)
_KIND = {
    "all_reduce": "allreduce",
    "all_reduce_coalesced": "allreduce",
    "all_gather": "allgather",
    "all_gather_into_tensor": "allgather",
    "_all_gather_base": "allgather",
    "all_gather_single": "allgather",
    "all_gather_coalesced": "allgather",
    "reduce_scatter": "reducescatter",
    "reduce_scatter_tensor": "reducescatter",
    "reduce_scatter_single": "reducescatter",
    "_reduce_scatter_base": "reducescatter",
    "reduce": "reduce",
    "broadcast": "broadcast",
    "send": "send",
    "isend": "send",
    "recv": "recv",
    "irecv": "recv",
    "all_to_all_single": "alltoall",
    "all_to_all": "alltoall",
    "gather": "gather",
    "scatter": "scatter",
    "all_gather_object": "object",
    "broadcast_object_list": "object",
    "gather_object": "object",
    "scatter_object_list": "object",
    "send_object_list": "object",
    "recv_object_list": "object",
    "barrier": "object",
    "monitored_barrier": "object",
    "batch_isend_irecv": "batch",
}
OPS = tuple(_KIND)

# Names torch's own code compares by identity inside distributed_c10d; patched only elsewhere.
_IDENTITY_SENSITIVE = frozenset({"all_reduce", "all_gather_single", "reduce_scatter_single", "isend", "irecv"})
_SCAN_PREFIXES = ("deepspeed", "distlm")


class CallRecord(NamedTuple):
    op: str
    n: int                      # group size (2 for a point-to-point pair)
    ranks: tuple[int, ...]      # global ranks of the group (the pair for send/recv)
    category: str
    payload_bytes: int
    wire_bytes: float


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _sum_nbytes(ts) -> int:
    if ts is None:
        return 0
    if isinstance(ts, torch.Tensor):
        return _nbytes(ts)
    return sum(_sum_nbytes(t) for t in ts)


def _wire(kind: str, n: int, payload: float) -> float:
    if n <= 1:
        return 0.0
    if kind == "allreduce":
        return 2.0 * (n - 1) / n * payload
    if kind in ("allgather", "reducescatter", "reduce", "broadcast", "alltoall"):
        return (n - 1) / n * payload
    raise ValueError(kind)


def _bind(fn: Callable, args: tuple, kwargs: dict) -> dict:
    sig = _signature(fn)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


@functools.lru_cache(maxsize=None)
def _signature(fn: Callable):
    import inspect
    return inspect.signature(fn)


class _Wrapper:
    """A counting stand-in for one original collective function.

    It compares equal to (and hashes like) the function it wraps, so torch's
    ``op in [isend, irecv]`` check accepts it; identity is kept distinct on purpose.
    Once its counter is stopped it is a plain pass-through (for a copy someone kept).
    """

    def __init__(self, counter: "CommsCounter", name: str, orig: Callable):
        self._counter = counter
        self._name = name
        self._orig = orig
        functools.update_wrapper(self, orig)

    def __call__(self, *args, **kwargs):
        c = self._counter
        if not c._active:
            return self._orig(*args, **kwargs)
        tls = c._tls
        depth = getattr(tls, "depth", 0)
        if depth:
            return self._orig(*args, **kwargs)
        tls.depth = 1
        try:
            if self._name == "batch_isend_irecv":
                return c._batch_isend_irecv(self._orig, args, kwargs)
            c._safe_record(self._name, self._orig, args, kwargs)
            return self._orig(*args, **kwargs)
        finally:
            tls.depth = 0

    def __eq__(self, other):
        return other is self or other is self._orig

    def __hash__(self):
        return hash(self._orig)

    def __repr__(self):
        return f"<counted {self._name}>"


class CommsCounter:
    """Counts calls, payload bytes and wire bytes of torch.distributed collectives while active.

    ``classify`` maps a call's group (a sorted tuple of global ranks; for send/recv the
    sorted pair ``(me, peer)``) to a category such as ``"tp"``, ``"dp"``, ``"pp"``; by
    default everything is ``"all"``. Use as a context manager or with :meth:`start` /
    :meth:`stop`. ``keep_records`` also keeps every :class:`CallRecord` in ``self.records``.
    """

    def __init__(self, classify: Optional[Callable[[tuple[int, ...]], str]] = None, *,
                 keep_records: bool = False):
        self.classify = classify
        self.keep_records = keep_records
        self.records: list[CallRecord] = []
        self.record_errors = 0
        self._active = False
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, str], list] = {}
        self._patched: list[tuple[Any, str, Any, Any]] = []  # (owner, attr, original, wrapper)
        self._ranks_cache: dict[Any, tuple[int, ...]] = {}
        self._category_cache: dict[tuple[int, ...], str] = {}

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "CommsCounter":
        if self._active or self._patched:
            raise RuntimeError("CommsCounter is already active")
        try:
            self._patch_all()
        except BaseException:
            self.stop()
            raise
        self._active = True
        return self

    def _patch_all(self) -> None:
        self._ranks_cache.clear()
        self._category_cache.clear()
        wrappers: dict[int, _Wrapper] = {}  # id(original) -> its one wrapper

        def base_of(value):
            # A wrapper left behind by a stopped counter (e.g. kept by an object built while
            # it ran) stands for its original; an active one belongs to someone else.
            if isinstance(value, _Wrapper):
                return None if value._counter._active else value._orig
            return value

        def wrap(owner, attr, name, value):
            base = base_of(value)
            if base is None or not callable(base):
                return
            w = wrappers.get(id(base))
            if w is None:
                w = wrappers[id(base)] = _Wrapper(self, name, base)
            setattr(owner, attr, w)
            self._patched.append((owner, attr, value, w))  # value: what stop() puts back

        import torch.distributed as dist
        c10d = dist.distributed_c10d
        by_id: dict[int, str] = {}  # known originals -> op name
        for name in OPS:
            for mod in (c10d, dist):
                fn = base_of(getattr(mod, name, None))
                if callable(fn):
                    by_id.setdefault(id(fn), name)
        for name in OPS:
            if hasattr(dist, name):
                wrap(dist, name, name, getattr(dist, name))
            if name not in _IDENTITY_SENSITIVE and hasattr(c10d, name):
                wrap(c10d, name, name, getattr(c10d, name))

        def wrap_aliases(owner):
            try:
                items = list(vars(owner).items())
            except TypeError:
                return
            for attr, value in items:
                base = base_of(value)
                name = by_id.get(id(base)) if base is not None else None
                if name is not None:
                    wrap(owner, attr, name, value)

        # aliases imported by name into DeepSpeed's and our own modules
        for modname, mod in list(sys.modules.items()):
            if mod is not None and modname.startswith(_SCAN_PREFIXES):
                wrap_aliases(mod)
        # deepspeed.comm's backend object keeps two functions as instance attributes
        ds_comm = sys.modules.get("deepspeed.comm.comm")
        cdb = getattr(ds_comm, "cdb", None) if ds_comm is not None else None
        if cdb is not None and hasattr(cdb, "__dict__"):
            wrap_aliases(cdb)

    def stop(self) -> None:
        self._active = False
        for owner, attr, orig, w in reversed(self._patched):
            # only undo our own patch: leave a later patcher's replacement in place
            if getattr(owner, attr, None) is w:
                setattr(owner, attr, orig)
        self._patched.clear()

    def __enter__(self) -> "CommsCounter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def active(self) -> bool:
        return self._active

    # ---- results -----------------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self._stats.clear()
            self.records.clear()

    def snapshot(self) -> dict:
        """``{category: {op: {"calls": int, "payload_bytes": int, "wire_bytes": float}}}``."""
        out: dict = {}
        with self._lock:
            for (cat, op), (calls, payload, wire) in sorted(self._stats.items()):
                out.setdefault(cat, {})[op] = {"calls": calls, "payload_bytes": payload, "wire_bytes": wire}
        return out

    # ---- recording ---------------------------------------------------------------------------

    def _safe_record(self, name, orig, args, kwargs) -> None:
        try:
            self._record(name, orig, args, kwargs)
        except Exception as e:  # accounting must never break training
            self.record_errors += 1
            if self.record_errors == 1:
                warnings.warn(f"CommsCounter could not account a {name} call: {e!r}", RuntimeWarning)

    def _group_ranks(self, group) -> Optional[tuple[int, ...]]:
        import torch.distributed as dist
        key = group if group is not None else dist.GroupMember.WORLD
        ranks = self._ranks_cache.get(key)
        if ranks is None:
            pg = key if key is not None else dist.distributed_c10d._get_default_group()
            ranks = self._ranks_cache[key] = tuple(sorted(dist.get_process_group_ranks(pg)))
        return ranks

    def _category(self, ranks: tuple[int, ...]) -> str:
        cat = self._category_cache.get(ranks)
        if cat is None:
            cat = self._category_cache[ranks] = self.classify(ranks) if self.classify else "all"
        return cat

    def _add(self, op: str, ranks: tuple[int, ...], payload: int, wire: float) -> None:
        cat = self._category(ranks)
        with self._lock:
            s = self._stats.get((cat, op))
            if s is None:
                s = self._stats[(cat, op)] = [0, 0, 0.0]
            s[0] += 1
            s[1] += payload
            s[2] += wire
            if self.keep_records:
                self.records.append(CallRecord(op, len(ranks), ranks, cat, payload, wire))

    def _record(self, name: str, orig: Callable, args: tuple, kwargs: dict) -> None:
        import torch.distributed as dist
        a = _bind(orig, args, kwargs)
        group = a.get("group")
        if group is dist.GroupMember.NON_GROUP_MEMBER:
            return  # torch makes this a no-op on ranks outside the group
        kind = _KIND[name]
        if kind in ("send", "recv"):
            self._record_p2p(name, kind, a["tensor"], group,
                             a.get("dst") if kind == "send" else a.get("src"),
                             a.get("group_dst") if kind == "send" else a.get("group_src"))
            return
        ranks = self._group_ranks(group)
        n = len(ranks)
        if kind == "object":
            self._add(name, ranks, 0, 0.0)
            return
        if kind == "gather":
            piece = _nbytes(a["tensor"])
            root = self._root(group, a.get("dst"), a.get("group_dst"))
            self._add(name, ranks, n * piece, 0.0 if dist.get_rank() == root or n <= 1 else float(piece))
            return
        if kind == "scatter":
            piece = _nbytes(a["tensor"])
            root = self._root(group, a.get("src"), a.get("group_src"))
            self._add(name, ranks, n * piece, float((n - 1) * piece) if dist.get_rank() == root else 0.0)
            return
        if name == "all_reduce":
            payload = _nbytes(a["tensor"])
        elif name == "all_reduce_coalesced":
            payload = _sum_nbytes(a["tensors"])
        elif name == "all_gather":
            payload = _sum_nbytes(a["tensor_list"])
        elif name == "all_gather_coalesced":
            payload = _sum_nbytes(a["output_tensor_lists"])
        elif kind == "allgather":
            payload = _nbytes(a["output_tensor"])
        elif name == "reduce_scatter":
            payload = _sum_nbytes(a["input_list"])
        elif kind == "reducescatter":
            payload = _nbytes(a["input"])
        elif name == "all_to_all":
            payload = _sum_nbytes(a["input_tensor_list"])
        elif name == "all_to_all_single":
            payload = _nbytes(a["input"])
        else:  # reduce, broadcast
            payload = _nbytes(a["tensor"])
        self._add(name, ranks, payload, _wire(kind, n, payload))

    def _root(self, group, rank, group_rank) -> Optional[int]:
        import torch.distributed as dist
        if rank is not None:
            return rank
        if group_rank is not None:
            return dist.get_global_rank(group if group is not None else dist.GroupMember.WORLD, group_rank)
        return 0 if group is None else dist.get_global_rank(group, 0)

    def _record_p2p(self, name, kind, tensor, group, peer, group_peer) -> None:
        import torch.distributed as dist
        if group_peer is not None and peer is None:
            peer = dist.get_global_rank(group if group is not None else dist.GroupMember.WORLD, group_peer)
        if peer is None:  # receive from any source: all we know is the group
            ranks = self._group_ranks(group)
        else:
            ranks = tuple(sorted({dist.get_rank(), int(peer)}))
        payload = _nbytes(tensor)
        self._add(name, ranks, payload, float(payload) if kind == "send" else 0.0)

    def _batch_isend_irecv(self, orig: Callable, args: tuple, kwargs: dict):
        """Count each op of the batch, then run it with torch's own isend / irecv.

        torch picks send vs receive by ``op.op is isend``; an op built while counting holds a
        wrapper, so the batch handed to torch carries the originals instead.
        """
        import torch.distributed as dist
        c10d = dist.distributed_c10d
        try:
            p2p_op_list = _bind(orig, args, kwargs)["p2p_op_list"]
        except TypeError:
            return orig(*args, **kwargs)  # let torch report the bad call
        if not isinstance(p2p_op_list, list):
            return orig(*args, **kwargs)
        fixed = []
        for op in p2p_op_list:
            fn = op.op
            base = fn._orig if isinstance(fn, _Wrapper) else fn
            name = "isend" if base is c10d.isend else "irecv" if base is c10d.irecv else None
            if name is not None:
                try:
                    self._record_p2p(name, "send" if name == "isend" else "recv", op.tensor, op.group,
                                     op.peer, None)
                except Exception as e:
                    self.record_errors += 1
                    warnings.warn(f"CommsCounter could not account a {name} call: {e!r}", RuntimeWarning)
            if base is not fn:
                clone = object.__new__(type(op))
                clone.__dict__.update(op.__dict__)
                clone.op = base
                op = clone
            fixed.append(op)
        return orig(fixed)


def merge_snapshots(snapshots: list[dict]) -> dict:
    """Sum per-rank snapshots (e.g. from ``all_gather_objects``) into one."""
    out: dict = {}
    for snap in snapshots:
        for cat, ops in snap.items():
            dst = out.setdefault(cat, {})
            for op, v in ops.items():
                d = dst.setdefault(op, {"calls": 0, "payload_bytes": 0, "wire_bytes": 0.0})
                d["calls"] += v["calls"]
                d["payload_bytes"] += v["payload_bytes"]
                d["wire_bytes"] += v["wire_bytes"]
    return {cat: dict(sorted(ops.items())) for cat, ops in sorted(out.items())}


# ---- the minimum ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommsModel:
    """Wire bytes per optimizer step that a layout must move, summed over ALL ranks."""
    tp: float
    dp: float
    pp: float

    @property
    def total(self) -> float:
        return self.tp + self.dp + self.pp


def minimum_bytes(*, tp: int, pp: int, dp: int, zero_stage: int, n_layers: int, d_model: int,
                  vocab_size: int, micro_batch: int, seq_len: int, grad_accum: int,
                  stage_params: list[int], activation_bytes: int, grad_bytes: int, param_bytes: int,
                  sequence_parallel: bool = False, tied_embeddings: bool = True,
                  activation_checkpointing: bool = False, pipe_partitioned: bool = True,
                  persistent_params: list[int] | None = None) -> CommsModel:
    """The wire bytes per optimizer step (``grad_accum`` micro-batches) a layout cannot avoid.

    Notation: b = micro_batch, s = seq_len, h = d_model, V = vocab_size,
    A = b*s*h*activation_bytes (one activation tensor of a micro-batch), and for pipeline stage i
    G_i = stage_params[i]*grad_bytes, P_i = stage_params[i]*param_bytes, where stage_params[i]
    counts what ONE tp rank of the stage holds. Per-rank wire factors are those of the module
    docstring (all-reduce 2(n-1)/n, the rest (n-1)/n), and every figure is summed over all ranks.

    TP (Megatron tensor parallelism; each all-reduce of A over tp ranks costs tp * 2(tp-1)/tp * A
    = 2(tp-1)*A over the group; there are dp*pp tp groups and the pp stages of one replica hold
    the n_layers layers between them, so per micro-batch it is dp * [count] * 2(tp-1)*A):
      - per transformer layer: forward 2 all-reduces (after the row-parallel attention output
        and MLP down projections), backward 2 (the input gradients of the column-parallel QKV
        and MLP up projections) -> 4 per layer; with activation_checkpointing the attention's
        forward all-reduce runs again in backward (the MLP's is not needed) -> 5. With sequence_parallel each all-reduce becomes an all-gather
        plus a reduce-scatter of the same A: the same wire total, so the count is unchanged;
      - + 1: the vocab-parallel embedding's forward all-reduce of its output (first stage);
      - + 1: the backward all-reduce of the LM head's input gradient (last stage; the head is
        column-parallel over the vocabulary and its input is replicated);
      - + the vocab-parallel cross-entropy's 3 all-reduces of b*s fp32 values (max logit,
        sum of exp, target logit): 3 * 2(tp-1) * b*s*4.
      times grad_accum. (With sequence parallelism the LayerNorm weight gradients also need a
      tp all-reduce once per step; at ~4*n_layers*h elements it is left out.)

    DP (data parallelism over dp ranks; per rank of stage i, times tp*dp ranks per stage):
      - ZeRO 0: one all-reduce of the accumulated gradients at the step boundary:
        2(dp-1)/dp * G_i;
      - ZeRO 1: reduce-scatter of the gradients at the boundary (each rank only updates its
        optimizer-state shard) + all-gather of the updated parameters: (dp-1)/dp * (G_i + P_i);
      - ZeRO 2: the gradients are partitioned, so a rank cannot hold the full accumulated
        gradient between micro-batches; they are reduce-scattered every micro-batch (DeepSpeed
        does: "ZeRO stage >= 2 communicates during non gradient accumulation boundaries as
        well", engine.allreduce_gradients) + one parameter all-gather per step:
        (dp-1)/dp * (grad_accum*G_i + P_i);
      - ZeRO 3: parameters live only as shards, so each micro-batch gathers them for the
        forward and again for the backward, and reduce-scatters the gradients (stage3 reduces
        in its backward hooks every micro-batch); the step updates shards in place, so no
        extra all-gather: (dp-1)/dp * grad_accum * (2*P_i + G_i). Parameters below DeepSpeed's
        ``stage3_param_persistence_threshold`` (``persistent_params``, per stage) stay whole on
        every rank and are all-gathered once after the update instead.

    PP (pipeline parallelism; pp-1 stage boundaries per replica, dp replicas):
      - per micro-batch and boundary the activation A goes forward and its gradient A back, as
        send (wire = S). The activation is replicated over the tp ranks of a stage, so only
        A needs to cross the boundary: DeepSpeed's pipeline engine (``pipe_partitioned`` and
        ``grad_partitioned``, on by default when tp > 1) sends each tp rank's 1/tp slice and
        the receiving tp group all-gathers it, which is (tp-1)*A per boundary, direction and
        micro-batch over the tp links, charged to tp. With ``pipe_partitioned=False`` every tp
        rank sends its own copy instead (tp*A across the boundary, no all-gather). With
        sequence parallelism each tp rank holds and sends an A/tp shard anyway (A, no gather):
        2*(pp-1)*dp*grad_accum*(A, or tp*A unpartitioned);
      - tied_embeddings with pp > 1: first and last stage both hold the embedding, and its
        gradient is all-reduced once per step in 2-rank tie groups (one per tp rank and dp
        replica): per rank 2*(2-1)/2 * (V/tp)*h*grad_bytes, total 2*tp*dp*(V/tp)*h*grad_bytes.
        It is charged to pp because it exists only because the model was cut into stages.

    What DeepSpeed 0.19.8 really issues for dp (measured with :class:`CommsCounter`, gloo):
    ZeRO 0 and 3 match the formulas above (ZeRO 3 via ``reduce_scatter_tensor`` each
    micro-batch). ZeRO 1 and 2 with the default ``use_multi_rank_bucket_allreduce: true``
    ALL-REDUCE each gradient bucket and keep their slice (2(dp-1)/dp * G instead of
    (dp-1)/dp * G, so 1.5x the minimum when G = P, more than ZeRO 0), whatever
    ``reduce_scatter`` says (false all-reduces too). With ``use_multi_rank_bucket_allreduce:
    false`` (and ``reduce_scatter: true``) each bucket becomes one ``reduce`` per owning rank,
    which moves exactly the minimum. Every ZeRO step also all-reduces a 4-byte overflow flag.
    """
    for name, v in (("tp", tp), ("pp", pp), ("dp", dp), ("grad_accum", grad_accum)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    if len(stage_params) != pp:
        raise ValueError(f"stage_params has {len(stage_params)} entries for pp={pp}")

    b, s, h = micro_batch, seq_len, d_model
    A = float(b * s * h * activation_bytes)

    # TP
    # Recomputing a block repeats its attention's forward all-reduce (the MLP's input depends on
    # it) but not the MLP's: the backward never needs the block's output, and torch's
    # non-reentrant checkpoint stops recomputing once it has what the backward needs.
    per_mb_allreduces = n_layers * (5 if activation_checkpointing else 4) + 2
    ar_group = 2.0 * (tp - 1)  # an all-reduce of X over one tp group moves 2(tp-1)*X in total
    tp_bytes = dp * grad_accum * ar_group * (per_mb_allreduces * A + 3 * b * s * 4)

    # DP
    f = (dp - 1) / dp
    dp_bytes = 0.0
    for stage, params in enumerate(stage_params):
        G, P = float(params) * grad_bytes, float(params) * param_bytes
        if zero_stage == 0:
            per_rank = 2 * f * G
        elif zero_stage == 1:
            per_rank = f * (G + P)
        elif zero_stage == 2:
            per_rank = f * (grad_accum * G + P)
        else:
            # Parameters under DeepSpeed's stage3_param_persistence_threshold stay whole on every
            # rank: never gathered for a forward or backward, only all-gathered once after the
            # update, like ZeRO 1.
            kept = float(persistent_params[stage] if persistent_params else 0) * param_bytes
            per_rank = f * (grad_accum * (2 * (P - kept) + G) + kept)
        dp_bytes += tp * dp * per_rank

    # PP
    crossings = 2.0 * (pp - 1) * dp * grad_accum  # boundaries x directions x micro-batches, all replicas
    if sequence_parallel or pipe_partitioned:
        pp_bytes = crossings * A
        if not sequence_parallel:
            tp_bytes += crossings * (tp - 1) * A  # re-assembling the slices on the receiving stage
    else:
        pp_bytes = crossings * tp * A
    if tied_embeddings and pp > 1:
        pp_bytes += 2.0 * tp * dp * (vocab_size / tp) * h * grad_bytes

    return CommsModel(tp=float(tp_bytes), dp=float(dp_bytes), pp=float(pp_bytes))


def report_lines(measured: dict, minimum: CommsModel, steps: int) -> list[str]:
    """Lines comparing a merged snapshot covering ``steps`` optimizer steps with the minimum.

    Categories are the classifier's names; ``tp``/``dp``/``pp`` are matched with the model's
    fields, any other category is shown without a minimum.
    """
    steps = max(int(steps), 1)
    cats = list(dict.fromkeys(["tp", "dp", "pp"] + sorted(measured)))
    lines = [f"comms per step over {steps} steps (wire MB summed over ranks, 1 MB = 1e6 B)"]
    total_m = 0.0
    for cat in cats:
        ops = measured.get(cat, {})
        m = sum(v["wire_bytes"] for v in ops.values()) / steps
        mn = getattr(minimum, cat, None) if cat in ("tp", "dp", "pp") else None
        if not ops and not mn:
            continue
        total_m += m
        if mn is None:
            ratio, mn_s = "-", "-"
        else:
            mn_s = f"{mn / MB:.3f}"
            ratio = f"{m / mn:.2f}x" if mn > 0 else ("-" if m == 0 else "inf")
        lines.append(f"  {cat:<6} measured {m / MB:12.3f}  minimum {mn_s:>12}  ratio {ratio}")
        for op, v in sorted(ops.items()):
            lines.append(f"    {op:<24} {v['calls'] / steps:9.1f} calls/step  payload {v['payload_bytes'] / steps / MB:10.3f}"
                         f"  wire {v['wire_bytes'] / steps / MB:10.3f} MB/step")
    mt = minimum.total
    lines.append(f"  {'total':<6} measured {total_m / MB:12.3f}  minimum {mt / MB:12.3f}  ratio "
                 + (f"{total_m / mt:.2f}x" if mt > 0 else "-"))
    return lines
