"""Calibration and training on several processes: the collectives sparsecc needs when torch.distributed is
initialised.

Every rank observes its own shard of the calibration batches. The ranks share the planning (each plans
every world_size-th region), so each region's statistics (sums and counts, or capped row samples; never
averages: gloo has no AVG) are reduced onto the rank that plans it, which then holds the statistics of
the union of the shards. The plans are exchanged and every rank checks a digest of the plans it will use. Between stages every rank reports its outcome, so an error on one rank ends the stage on all of them
with a message naming the rank, and a rank that died is named (gloo's monitored barrier) instead of
leaving the others waiting.
"""

from __future__ import annotations

import datetime
import os
import pickle
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from sparsecc.errors import DistributedError

TIMEOUT_ENV = "SPARSECC_DIST_TIMEOUT"  # seconds a stage waits for the slowest rank (default 1800)


class Comm:
    """The collectives of one process group, counting the bytes this rank sends."""

    def __init__(self, group: Optional[Any] = None, timeout_s: Optional[float] = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.timeout = datetime.timedelta(seconds=float(timeout_s or os.environ.get(TIMEOUT_ENV, 1800)))
        self.bytes_sent = 0

    # -- data ---------------------------------------------------------------------------------------------
    def reduce_sum(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        """Sum of `tensor` over ranks, on rank `dst` (the other ranks' tensors are left undefined)."""
        if self.rank != dst:
            self.bytes_sent += tensor.numel() * tensor.element_size()
        dist.reduce(tensor, dst=dst, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def mean(self, values: Any) -> Any:
        """The mean over the ranks of a number, or of each number of a dict (losses to log: every rank
        gets the same values), in one all-reduce."""
        keys = sorted(values) if isinstance(values, dict) else None
        t = torch.tensor([float(values[k]) for k in keys] if keys else [float(values)], dtype=torch.float64)
        self.bytes_sent += t.numel() * t.element_size()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        t /= self.world_size
        return {k: float(v) for k, v in zip(keys, t)} if keys else float(t)

    def average_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` replaced, in place, by its mean over the ranks (a buffer each rank updated on its shard)."""
        self.bytes_sent += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor.div_(self.world_size)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj`, on every rank (a decision one rank takes for all)."""
        if self.rank == src:
            self.bytes_sent += len(pickle.dumps(obj)) * (self.world_size - 1)
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def gather(self, obj: Any, dst: int) -> Optional[list]:
        """Every rank's `obj` in rank order, on rank `dst` (None elsewhere)."""
        if self.rank != dst:
            self.bytes_sent += len(pickle.dumps(obj))
        out: Optional[list] = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst, group=self.group)
        return out

    def all_gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order."""
        self.bytes_sent += len(pickle.dumps(obj))
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    # -- agreement ----------------------------------------------------------------------------------------
    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def settle(self, stage: str, error: Optional[BaseException] = None) -> None:
        """End `stage` on every rank together: raise on all ranks if any rank failed or stopped answering.

        A rank that raised passes its exception as `error`; the others learn its rank and message. A rank
        that died or hangs is found by gloo's monitored barrier (named), or by the backend's timeout.
        """
        if self.backend == "gloo":
            try:
                dist.monitored_barrier(group=self.group, timeout=self.timeout, wait_all_ranks=True)
            except RuntimeError as err:
                raise DistributedError(f"{stage}: rank {self.rank} of {self.world_size} gave up waiting for the "
                                       f"others: {_first_line(err)}. A rank that died or hangs ends the run; "
                                       "its own log says why") from error or err
        try:
            outcomes = self.all_gather(None if error is None else f"{type(error).__name__}: {error}")
        except RuntimeError as err:
            raise DistributedError(f"{stage}: a rank stopped answering ({_first_line(err)}); its own log says "
                                   "why") from error or err
        failed = {r: msg for r, msg in enumerate(outcomes) if msg is not None}
        if failed:
            told = "; ".join(f"rank {r}: {msg}" for r, msg in failed.items())
            raise DistributedError(f"{stage} failed on {len(failed)} of {self.world_size} rank(s): {told}") \
                from error

    def check_same(self, what: str, value: Any, hint: str) -> None:
        """Raise on every rank unless every rank passed an equal `value` (compared with rank 0's)."""
        values = self.all_gather(value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            detail = _first_difference(values[0], values[differ[0]])
            raise DistributedError(f"{what} differ across ranks: rank(s) {differ} differ from rank 0"
                                   f"{detail}. {hint}")


def current(group: Optional[Any] = None) -> Optional[Comm]:
    """A Comm when torch.distributed is initialised with more than one process, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    comm = Comm(group)
    return comm if comm.world_size > 1 else None


def shard(batches: Sequence[Any], rank: Optional[int] = None, world_size: Optional[int] = None) -> list:
    """This rank's contiguous share of `batches` (rank 0 the first ones). Contiguous shards make the
    distributed plans equal, bit for bit, to the plans of one process calibrating on all of `batches`."""
    if rank is None or world_size is None:
        comm = current()
        rank, world_size = (0, 1) if comm is None else (comm.rank, comm.world_size)
    batches = list(batches)
    if len(batches) < world_size:
        raise DistributedError(f"{len(batches)} calibration batch(es) for {world_size} ranks: every rank needs at "
                               "least one; pass more batches or run fewer processes")
    start, stop = rank * len(batches) // world_size, (rank + 1) * len(batches) // world_size
    return batches[start:stop]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _first_difference(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        for k in keys:
            if a.get(k) != b.get(k):
                return f" (first at {k!r}: rank 0 has {str(a.get(k))[:60]}, the other {str(b.get(k))[:60]})"
    return ""
