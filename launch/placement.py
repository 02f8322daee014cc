"""Where rollout engines and trainer ranks run: stated by `conf.placement`, checked
against what Ray reports for the cluster before any actor starts, then reserved as one
placement group whose bundles the actors are pinned to.

    layout = plan(conf.placement, num_ranks, num_engines, tp)   # pure: bundles and slots
    check_fit(layout, cluster_nodes(), ray.available_resources())  # PlacementError, at once
    reserved = reserve(layout, timeout_s)                       # bounded wait, then strategies
    TrainerGroup(..., scheduling=reserved.trainer_strategies())
    reserved.release()

split:    trainer rank r -> bundle {GPU: 1, CPU: c}; engine e -> bundle {GPU: tp, CPU: c}.
colocate: bundle g = {GPU: 1, CPU: 2c} holds trainer rank g and engine g, each asking
          half the GPU (Ray then gives both the same device).
No GPUs (the CPU placement): nothing is reserved here; the groups start as they always
did (the trainer group packs its own ranks), which is what CI and `make train` run.

Whether GPUs are used is decided here, by the placement and the cluster's resources,
never by the driver host's `torch.cuda` (a CPU-only Ray head drives GPU workers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from cispo.config_checks import PLACEMENT_PRESETS

log = logging.getLogger("cispo")

COLOCATED_SHARE = 0.5  # of a GPU, for each of the two actors sharing it


class PlacementError(RuntimeError):
    """The placement cannot be satisfied by the cluster; the message has the numbers."""


@dataclass(frozen=True)
class Slot:
    """One actor's share: a bundle of the placement group and what it asks of it."""

    bundle: int
    num_gpus: float
    num_cpus: float


@dataclass(frozen=True)
class Layout:
    mode: str
    bundles: tuple[dict[str, float], ...]
    trainer: tuple[Slot, ...]
    rollout: tuple[Slot, ...]

    @property
    def on_gpu(self) -> bool:
        return any(b.get("GPU", 0) > 0 for b in self.bundles)

    @property
    def colocated(self) -> bool:
        return self.mode == "colocate" and self.on_gpu

    @property
    def gpus(self) -> float:
        return sum(b.get("GPU", 0) for b in self.bundles)

    @property
    def cpus(self) -> float:
        return sum(b.get("CPU", 0) for b in self.bundles)

    def describe(self) -> str:
        if not self.on_gpu:
            return f"CPU: {len(self.trainer)} trainer rank(s), {len(self.rollout)} rollout engine(s)"
        if self.colocated:
            return (f"colocate on {self.gpus:g} GPU(s): each GPU holds one trainer rank and one engine "
                    f"({COLOCATED_SHARE:g} GPU each), bundles {_fmt(self.bundles[0])}")
        return (f"split on {self.gpus:g} GPUs: {len(self.trainer)} trainer rank(s) x {_fmt(self.bundles[0])}, "
                f"{len(self.rollout)} engine(s) x {_fmt(self.bundles[len(self.trainer)])}")


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items(), key=lambda kv: kv[0] != "GPU")) + "}"


def plan(placement: Any, num_ranks: int, num_engines: int, tensor_parallel_size: int = 1) -> Layout:
    """The bundles and per-actor slots a placement asks for (no Ray needed)."""
    cpus = float(placement.cpus_per_actor)
    if placement.rollout_gpus == 0 and placement.trainer_gpus == 0:
        return Layout("cpu", (), tuple(Slot(-1, 0.0, cpus) for _ in range(num_ranks)),
                      tuple(Slot(-1, 0.0, cpus) for _ in range(num_engines)))
    if placement.mode == "colocate":
        if num_ranks != num_engines or tensor_parallel_size != 1:
            raise PlacementError(f"colocate pairs one trainer rank with one engine per GPU: got {num_ranks} ranks, "
                                 f"{num_engines} engines of tensor_parallel_size {tensor_parallel_size}")
        bundles = tuple({"GPU": 1.0, "CPU": 2 * cpus} for _ in range(num_ranks))
        slots = tuple(Slot(g, COLOCATED_SHARE, cpus) for g in range(num_ranks))
        return Layout("colocate", bundles, slots, slots)
    trainer = tuple({"GPU": 1.0, "CPU": cpus} for _ in range(num_ranks))
    rollout = tuple({"GPU": float(tensor_parallel_size), "CPU": cpus} for _ in range(num_engines))
    return Layout(
        "split", trainer + rollout,
        tuple(Slot(r, 1.0, cpus) for r in range(num_ranks)),
        tuple(Slot(num_ranks + e, float(tensor_parallel_size), cpus) for e in range(num_engines)),
    )


# ---------------------------------------------------------------------------- the cluster


@dataclass(frozen=True)
class Node:
    address: str
    gpus: float
    cpus: float


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster with their total GPUs and CPUs."""
    import ray

    return [
        Node(n.get("NodeManagerAddress", "?"), float(n["Resources"].get("GPU", 0)), float(n["Resources"].get("CPU", 0)))
        for n in ray.nodes()
        if n.get("Alive", n.get("alive", False))
    ]


def _pack(bundles: Sequence[dict[str, float]], nodes: Sequence[Node]) -> bool:
    """First-fit decreasing: can every bundle sit whole on some node?"""
    free = [[n.gpus, n.cpus] for n in nodes]
    for b in sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)), reverse=True):
        for f in free:
            if f[0] >= b.get("GPU", 0) and f[1] >= b.get("CPU", 0):
                f[0] -= b.get("GPU", 0)
                f[1] -= b.get("CPU", 0)
                break
        else:
            return False
    return True


def check_fit(layout: Layout, nodes: Sequence[Node], available: dict[str, float] | None = None) -> None:
    """Raise PlacementError, naming what was asked and what each node has, when the
    layout's bundles cannot all be placed (or the resources are taken right now)."""
    if not layout.on_gpu:
        return
    asked = (f"the placement asks for {layout.gpus:g} GPU(s) and {layout.cpus:g} CPU(s) in {len(layout.bundles)} "
             f"bundle(s) ({layout.describe()})")
    have = ", ".join(f"node {n.address}: {n.gpus:g} GPU, {n.cpus:g} CPU" for n in nodes) or "no alive nodes"
    total_gpus, total_cpus = sum(n.gpus for n in nodes), sum(n.cpus for n in nodes)
    hint = f"change the placement ({PLACEMENT_PRESETS}) or placement.trainer_gpus / placement.rollout_gpus"
    if not _pack(layout.bundles, nodes):
        raise PlacementError(f"{asked}, but the Ray cluster has {total_gpus:g} GPU(s) and {total_cpus:g} CPU(s) "
                             f"({have}), and a bundle must fit on one node; {hint}")
    if available is not None:
        free_gpus, free_cpus = float(available.get("GPU", 0)), float(available.get("CPU", 0))
        if free_gpus + 1e-9 < layout.gpus or free_cpus + 1e-9 < layout.cpus:
            raise PlacementError(f"{asked}; the cluster has them ({have}) but only {free_gpus:g} GPU(s) and "
                                 f"{free_cpus:g} CPU(s) are free now (other jobs or actors hold the rest); "
                                 f"wait for them or {hint}")


# ---------------------------------------------------------------------------- reservation


class Reservation:
    """One placement group holding every bundle of a layout."""

    def __init__(self, layout: Layout, pg: Any):
        self.layout = layout
        self.pg = pg

    def _strategies(self, slots: Sequence[Slot]) -> list[Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return [PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=s.bundle) for s in slots]

    def trainer_strategies(self) -> list[Any]:
        return self._strategies(self.layout.trainer)

    def rollout_strategies(self) -> list[Any]:
        return self._strategies(self.layout.rollout)

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            finally:
                self.pg = None


def reserve(layout: Layout, timeout_s: float, name: str = "cispo") -> Reservation:
    """Check the fit against the connected cluster, then reserve the bundles (PACK: as
    few nodes as possible, for NCCL). Waits at most `timeout_s`; the group is removed
    again when Ray cannot satisfy it in time."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    check_fit(layout, cluster_nodes(), ray.available_resources())
    pg = placement_group([dict(b) for b in layout.bundles], strategy="PACK", name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementError(
            f"Ray did not reserve {layout.describe()} within {timeout_s:g} s (placement.ready_timeout_s); "
            f"free now: {ray.available_resources()}")
    log.info("placement reserved: %s", layout.describe())
    return Reservation(layout, pg)
