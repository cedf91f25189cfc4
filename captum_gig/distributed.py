r"""Data-parallel helpers for runs under ``torchrun`` (``torch.distributed``).

Every dataset-wide stage of the library (:func:`~captum_gig.collect_pfvs`,
:meth:`~captum_gig.ConceptBasis.fit`, :meth:`~captum_gig.PFVDecomposer.transform`
with ``distributed=True``, :func:`~captum_gig.class_attribution`,
:func:`~captum_gig.interlayer_attribution`) checks :func:`is_distributed`; when
a process group with more than one process is initialised, each process (rank)
works on its shard and the partial results are combined with the collectives
below. Without a process group every helper is a no-op, so the same code runs
single-process.

Sharding is deterministic and, unlike :class:`torch.utils.data.DistributedSampler`,
never pads with duplicates: rank ``r`` of ``W`` takes items ``r, r + W, r + 2W, ...``
(:func:`shard_indices`), so every item is processed exactly once.

Launch::

    torchrun --nproc_per_node=8 -m captum_gig run ...            # one node, 8 GPUs (NCCL)
    torchrun --nproc_per_node=2 my_script.py                      # CPU (Gloo)

and in the script call :func:`init_from_env` (or
``torch.distributed.init_process_group`` yourself) before using the library.
"""

import os
from contextlib import contextmanager
from typing import Any, List, Optional

import torch
from torch import Tensor

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "init_from_env",
    "shard_indices",
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "broadcast_object",
    "barrier",
    "sharded_transform",
    "split_cluster",
    "split_batch",
    "leave",
    "local_only",
]


def _dist():
    import torch.distributed as dist

    return dist


_LOCAL = [False]  # inside local_only(): every helper behaves as in a single process

#: clusters with fewer rows than this are gathered and split by every process on its own
#: copy (no per-iteration all_reduce: splits of small clusters are latency-bound)
LOCAL_SPLIT_ROWS = 16384

#: a clustering of at most this many rows is fitted whole by every process (all hold every row)
LOCAL_FIT_ROWS = 16384


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    if _LOCAL[0]:
        return False
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def local_only():
    """Within this block the helpers act as in a single process (no collectives)."""
    before = _LOCAL[0]
    _LOCAL[0] = True
    try:
        yield
    finally:
        _LOCAL[0] = before


def rank() -> int:
    """This process's rank (0 single-process)."""
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 single-process)."""
    return _dist().get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and single-process): the process that writes artifacts and shows progress."""
    return rank() == 0


def init_from_env(backend: Optional[str] = None) -> bool:
    """Initialise the default process group from torchrun's environment variables.

    Does nothing (and returns False) when ``WORLD_SIZE`` is unset or 1, or a
    group exists already. ``backend`` defaults to ``"nccl"`` when CUDA is
    available and ``"gloo"`` otherwise; with NCCL the current CUDA device is
    set to ``LOCAL_RANK``.

    Returns:
        bool: whether this call initialised a process group.
    """
    dist = _dist()
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def leave(clean: bool = True) -> None:
    """Leave the default process group (no-op single-process).

    With ``clean``, every rank first waits for the others, so that no rank
    tears down its connections while another still uses them (Gloo aborts a
    process whose peer vanished mid-exchange: "terminate called without an
    active exception"). After a failure, leave without waiting: the other
    ranks may never get here.
    """
    if not is_distributed():
        return
    if clean:
        barrier()
    _dist().destroy_process_group()


def shard_indices(n: int, rank_: Optional[int] = None, world_size_: Optional[int] = None) -> Tensor:
    """Indices ``rank, rank + W, ...`` below ``n`` taken by one rank (no padding duplicates).

    Args:
        n (int): number of items.
        rank_ (int, optional): the rank; this process's by default.
        world_size_ (int, optional): the number of ranks; the current one by default.

    Returns:
        Tensor: ``(ceil((n - rank) / W),)`` int64 indices.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world_size_ is None else world_size_
    if not 0 <= r < w:
        raise ValueError(f"rank must be in [0, {w}); got {r}")
    return torch.arange(r, n, w)


def _comm_device(t: Tensor) -> torch.device:
    """NCCL needs CUDA tensors; Gloo takes CPU ones."""
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """Reduce ``t`` over all ranks (``"sum"``, ``"max"`` or ``"min"``); a new tensor, ``t`` is unchanged.

    Single-process it returns ``t`` itself. Booleans are reduced as int64.
    """
    if not is_distributed():
        return t
    dist = _dist()
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}; got {op!r}")
    work = t.detach().to(device=_comm_device(t), dtype=torch.int64 if t.dtype == torch.bool else t.dtype, copy=True)
    dist.all_reduce(work, op=ops[op])
    return work.to(device=t.device, dtype=t.dtype)


def all_gather(t: Tensor) -> List[Tensor]:
    """Every rank's ``t``, in rank order; sizes along dim 0 may differ between ranks.

    Other dimensions and the dtype must agree. Single-process: ``[t]``.
    """
    if not is_distributed():
        return [t]
    dist = _dist()
    device = _comm_device(t)
    w = world_size()
    size = torch.tensor([t.shape[0] if t.dim() else 1], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(w)]
    dist.all_gather(sizes, size)
    sizes_ = [int(s) for s in sizes]
    longest = max(sizes_)
    flat = t.detach().reshape(-1) if t.dim() == 0 else t.detach()
    cast = torch.uint8 if flat.dtype == torch.bool else flat.dtype
    padded = torch.zeros((longest,) + tuple(flat.shape[1:]), dtype=cast, device=device)
    padded[: flat.shape[0]] = flat.to(device=device, dtype=cast)
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    out = [p[:s].to(device=t.device, dtype=t.dtype) for p, s in zip(parts, sizes_)]
    return [o.reshape(()) for o in out] if t.dim() == 0 else out


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's picklable ``obj`` in rank order (for small metadata only). Single-process: ``[obj]``."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank. Single-process: ``obj``."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op single-process)."""
    if is_distributed():
        dist = _dist()
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def sharded_transform(decomposer, X: Tensor) -> Tensor:
    """``decomposer.transform(X)`` with the chunks of rows shared out over the processes.

    Every process passes the same ``X``. The rows are cut into the chunks of
    ``decomposer.chunk_size`` that a single process would solve together; rank
    ``r`` solves chunks ``r, r + W, ...`` and the coefficients are all-gathered,
    so the result is the single-process one on every process. Used by
    ``PFVDecomposer.transform(X, distributed=True)``.
    """
    from . import _layout

    Xl = decomposer._channels_last(X, "X")
    flat = Xl.reshape(-1, decomposer.n_channels)
    size = decomposer.chunk_size
    n_chunks = (flat.shape[0] + size - 1) // size
    mine = shard_indices(n_chunks).tolist()
    local = [flat[c * size : (c + 1) * size] for c in mine]
    if local:
        U_local = decomposer.transform(torch.cat(local))
    else:
        U_local = torch.empty(0, decomposer.n_concepts, dtype=flat.dtype, device=flat.device)
    U = torch.empty(flat.shape[0], decomposer.n_concepts, dtype=U_local.dtype, device=flat.device)
    for r, part in enumerate(all_gather(U_local)):
        offset = 0
        for c in range(r, n_chunks, world_size()):
            rows = min(size, flat.shape[0] - c * size)
            U[c * size : c * size + rows] = part[offset : offset + rows].to(U.device)
            offset += rows
    return _layout.move_channels_back(U.reshape(*Xl.shape[:-1], decomposer.n_concepts), X.dim())


def split_cluster(km, Y: Tensor, row_ids: Tensor, size: int, split_number: int) -> Tensor:
    """One 2-means split of a bisecting k-means cluster; the mask of this process's rows that move.

    ``Y`` holds this process's rows of the cluster (global row numbers
    ``row_ids``), ``size`` the cluster's size over all processes. Large
    clusters are split in place, every row sum all-reduced. A cluster smaller
    than :data:`LOCAL_SPLIT_ROWS` is all-gathered instead, in global row
    order, and every process splits the whole cluster exactly as a single
    process would.
    """
    if not is_distributed() or size >= LOCAL_SPLIT_ROWS:
        return km._split(Y, split_number, row_ids=row_ids)
    everyone = torch.cat(all_gather(row_ids))
    order = torch.sort(everyone).indices
    rows = torch.cat([part.to(Y.device) for part in all_gather(Y)])[order.to(Y.device)]
    with local_only():
        right = km._split(rows, split_number)
    position = torch.searchsorted(everyone[order], row_ids)
    return right[position.to(right.device)]


def split_batch(km, Y: Tensor, row_ids: Tensor, clusters: List[Tensor], grams=None):
    """Many bisecting k-means splits at once; per cluster, this process's rows that stay and move, and the sizes.

    ``clusters`` index this process's rows ``Y`` (global row numbers
    ``row_ids``). The rows of all of them are all-gathered, put in global row
    order within each cluster, and every process runs ``km._split_batch`` on
    the same data (and the same Gram matrices ``grams``, kept by global row
    number), as a single process would.

    Returns:
        list of (Tensor, Tensor, (int, int)): for each cluster, the entries of
        its index tensor that stay and those that move, and the two sizes over
        all processes.
    """
    if not is_distributed():
        return [(stay, move, (stay.shape[0], move.shape[0])) for stay, move in km._split_batch(Y, clusters, grams)]
    device = Y.device
    owner = torch.cat([torch.full((idx.shape[0],), c, dtype=torch.long) for c, idx in enumerate(clusters)]).to(device)
    mine = torch.cat(list(clusters)).to(device)
    ids = torch.cat(all_gather(row_ids[mine]))
    owners = torch.cat(all_gather(owner))
    rows = torch.cat(all_gather(Y[mine]))
    order = torch.argsort(owners * (int(ids.max()) + 1) + ids)
    ids, owners, rows = ids[order], owners[order], rows[order]
    counts = torch.bincount(owners, minlength=len(clusters)).tolist()
    starts = [sum(counts[:c]) for c in range(len(clusters))]
    with local_only():
        local = [torch.arange(s, s + n, device=device) for s, n in zip(starts, counts)]
        parts = km._split_batch(rows, local, grams, keys=[ids[s : s + n] for s, n in zip(starts, counts)])
    out = []
    for c, idx in enumerate(clusters):
        moving = torch.isin(row_ids[idx].to(ids.device), ids[parts[c][1]]).to(idx.device)
        out.append((idx[~moving], idx[moving], (counts[c] - parts[c][1].shape[0], parts[c][1].shape[0])))
    return out
