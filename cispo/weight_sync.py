"""The weight-sync contract between the trainer (sender) and rollout engines (receivers).

Weights travel in size-bounded buckets: each bucket is one flat tensor of one dtype
holding several parameters back to back. One collective (or one object-store put)
per bucket, never one per parameter — per-parameter RPCs are what make naive syncs
take minutes.

The sender plans buckets from (name, shape, dtype) and sends the plan (plain Python
data) to every receiver first; then both sides walk the same plan, so a receiver
knows exactly how to cut each flat tensor back into named parameters.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


@dataclass(frozen=True)
class ParamMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "torch.bfloat16" (a string so the plan pickles without torch types)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize


def plan_buckets(params: Iterable[ParamMeta], bucket_bytes: int) -> list[list[ParamMeta]]:
    """Group parameters, in order, into buckets of one dtype and at most bucket_bytes
    (a single parameter larger than the bound gets a bucket of its own)."""
    buckets: list[list[ParamMeta]] = []
    current: list[ParamMeta] = []
    size = 0
    for p in params:
        if current and (p.dtype != current[0].dtype or size + p.nbytes > bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += p.nbytes
    if current:
        buckets.append(current)
    return buckets


def meta_of(name: str, tensor: torch.Tensor) -> ParamMeta:
    return ParamMeta(name, tuple(tensor.shape), str(tensor.dtype))


def flatten_bucket(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten_bucket(flat: torch.Tensor, bucket: list[ParamMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for p in bucket:
        yield p.name, flat[offset : offset + p.numel].view(p.shape)
        offset += p.numel
    if offset != flat.numel():
        raise ValueError(f"bucket of {flat.numel()} elements does not match its plan of {offset}")


def empty_bucket(bucket: list[ParamMeta], device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.empty(sum(p.numel for p in bucket), dtype=bucket[0].torch_dtype, device=device)


ABORT_KEY = "cispo/abort"


class SyncAborted(RuntimeError):
    """The weight-sync group was told to give up (a member died): no more collectives on it."""


@dataclass
class SyncGroup:
    """A weight-sync process group and the TCPStore it was built from.

    The store doubles as an abort line: `request_abort` (from any process that can reach
    the store) sets a key every member polls while it waits on a broadcast, so a member
    that died makes the others give up in milliseconds instead of sitting out the group's
    timeout (gloo notices a closed peer connection on its own only for the pairs it is
    using at that moment; NCCL does not notice at all)."""

    pg: "dist.ProcessGroup"
    store: "dist.TCPStore"

    def aborted(self) -> bool:
        return self.store.check([ABORT_KEY])

    def abort(self) -> None:
        """Cancel whatever is in flight on this group (never raises: used on error paths)."""
        try:
            self.pg.abort()
        except Exception:
            pass


def create_sync_group(backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float = 300.0) -> SyncGroup:
    """A process group of its own (trainer rank 0 = rank 0, then every rollout worker).

    Built from a TCPStore rather than torch.distributed's default group, so it lives
    beside the trainer's DeepSpeed group and vLLM's own groups without touching them.
    """
    from datetime import timedelta

    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
    except Exception as err:  # DistNetworkError / DistStoreError: say which setting to change
        role = "listen on" if rank == 0 else f"reach (as rank {rank} of {world_size})"
        raise RuntimeError(f"weight-sync group: cannot {role} {host}:{port}: {str(err).splitlines()[0]}; "
                           "if the port is in use, set rollout.sync_port to a free port (0 = pick one)") from err
    if backend == "gloo":
        return SyncGroup(dist.ProcessGroupGloo(store, rank, world_size, timeout), store)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return SyncGroup(dist.ProcessGroupNCCL(store, rank, world_size, opts), store)
    raise ValueError(f"weight-sync backend {backend!r} is unknown; allowed: gloo, nccl")


def checksum(t: torch.Tensor, chunk: int = 1 << 24) -> int:
    """An exact fingerprint of a tensor's bits (any float dtype, any device): the sum over
    elements of bits(x_i) * (i mod 65521 + 1) in wrapping int64 arithmetic. Integer sums do
    not depend on the order of reduction, so equal tensors give equal numbers on every
    device; a changed, moved or swapped element changes it (barring a collision)."""
    flat = t.detach().contiguous().reshape(-1)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    bits = flat.view(ints)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), chunk):
        part = bits[start : start + chunk].to(torch.int64)
        idx = torch.arange(start, start + part.numel(), device=flat.device, dtype=torch.int64)
        total += (part * (idx % 65521 + 1)).sum()
    return int(total)


def share_bucket(flat: torch.Tensor) -> tuple:
    """A CUDA IPC handle of a flat bucket for another process on the same GPU (colocated
    engines): torch.multiprocessing's own reduction, plus the device's UUID so the receiver
    finds the same physical GPU whatever its device numbering. The sender must keep `flat`
    alive until the receiver is done with it."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(flat)
    return str(torch.cuda.get_device_properties(flat.device).uuid), args


def open_bucket(handle: tuple) -> torch.Tensor:
    """The tensor behind a `share_bucket` handle, mapped into this process (no copy)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    uuid, args = handle
    index = next((i for i in range(torch.cuda.device_count())
                  if str(torch.cuda.get_device_properties(i).uuid) == uuid), None)
    if index is None:
        raise RuntimeError(f"CUDA IPC: the sender's GPU {uuid} is not visible here "
                           f"(CUDA_VISIBLE_DEVICES and the placement must give both the same GPU)")
    args = list(args)
    args[6] = index  # the storage's device index, as numbered in this process
    return rebuild_cuda_tensor(*args)


def request_abort(host: str, port: int, timeout_s: float = 10.0) -> bool:
    """Tell every member of the sync group whose store is at host:port to give up; returns
    False when the store cannot be reached (its host, trainer rank 0, is gone)."""
    from datetime import timedelta

    try:
        client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                               wait_for_workers=False)
        client.set(ABORT_KEY, "1")
        return True
    except Exception:
        return False


def broadcast_bucket(group: SyncGroup, flat: torch.Tensor, poll_s: float = 0.002) -> None:
    """Root (rank 0 of the sync group) sends `flat`; receivers fill theirs in place.
    Raises SyncAborted (after cancelling the group's work) once an abort is requested."""
    if group.aborted():
        group.abort()
        raise SyncAborted("weight sync aborted: a member of the sync group failed")
    opts = dist.BroadcastOptions()  # the options form exists across torch releases
    opts.rootRank = 0
    work = group.pg.broadcast([flat], opts)
    wait_s = 0.0
    while not work.is_completed():
        if group.aborted():
            group.abort()
            raise SyncAborted("weight sync aborted: a member of the sync group failed")
        time.sleep(wait_s)
        wait_s = min(poll_s, wait_s + 0.0002)  # first checks at once: most buckets finish quickly
    work.wait()  # raises the collective's own error, if any
