"""Pipeline schedules as data: per-rank lists of actions, and the pipeline they run on.

A :class:`Schedule` maps each GPU (rank) to the ordered list of :data:`Step` it executes, the way
``torch.distributed.pipelining`` describes its schedules. A step is

* an :class:`Action` ``(phase, stage, microbatch)`` with phase

  - ``"F"``  forward of ``microbatch`` through ``stage``;
  - ``"B"``  backward for inputs (the whole backward when the workload has no ``W`` ops);
  - ``"W"``  backward for weights (dropped when the workload has no ``W`` ops);
  - ``"BW"`` the full backward: ``B`` then ``W`` back to back, for schedules that do not split
    the backward (GPipe, 1F1B, interleaved 1F1B, DualPipe's non-zero-bubble chunks);

* or an :class:`Overlap`: DualPipe's overlapped pair of a forward and a full backward of two
  independent chunks, started as one action (when the inputs of both have arrived).

Stages are the workload's (virtual) stage indices; the micro-batch index says which direction a
micro-batch travels in a bidirectional workload (see :func:`engine.workloads.pipeline.pipeline_direction`).
:class:`PipelineShape` reads what a generator needs from a ``pipeline`` workload and checks the
layouts the schedules need (linear, round-robin, V, bidirectional).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from engine.core.errors import InputError
from engine.workloads.pipeline import pipeline_device, pipeline_direction, pipeline_op_id

ACTION_PHASES = ("F", "B", "W", "BW")


@dataclass(frozen=True)
class Action:
    """One compute action: ``phase`` (see :data:`ACTION_PHASES`) of ``microbatch`` at ``stage``."""

    phase: str
    stage: int
    microbatch: int

    def __post_init__(self):
        if self.phase not in ACTION_PHASES:
            raise ValueError(f"unknown action phase {self.phase!r}")

    def op_ids(self, has_w: bool) -> list[str]:
        """Workload op ids this action runs, in order (``BW`` is ``B`` then ``W``)."""
        phases: tuple[str, ...]
        if self.phase == "BW":
            phases = ("B", "W") if has_w else ("B",)
        elif self.phase == "W":
            phases = ("W",) if has_w else ()
        else:
            phases = (self.phase,)
        return [pipeline_op_id(ph, self.microbatch, self.stage) for ph in phases]

    def __str__(self) -> str:
        return f"{self.stage}{self.phase}{self.microbatch}"


@dataclass(frozen=True)
class Overlap:
    """An overlapped forward / full-backward pair (DualPipe's ``F&B``), run as one slot.

    In a plan the pair's ops are placed back to back on the compute stream, forward first: the
    forward's activation is then counted as allocated while the backward's is still live, which
    is the memory an overlapped pair really holds (DualPipe's published ``p + 1``).
    """

    forward: Action
    backward: Action

    def __post_init__(self):
        if self.forward.phase != "F" or self.backward.phase not in ("B", "BW"):
            raise ValueError(f"an overlap pairs a forward with a backward, got {self.forward} and {self.backward}")

    def op_ids(self, has_w: bool) -> list[str]:
        return self.forward.op_ids(has_w) + self.backward.op_ids(has_w)

    def __str__(self) -> str:
        return f"({self.forward};{self.backward})"


Step = Union[Action, Overlap]


@dataclass
class Schedule:
    """A named schedule: per GPU, the ordered steps it runs. ``meta`` holds generator figures."""

    name: str
    ranks: dict[int, list[Step]]
    meta: dict[str, Any] = field(default_factory=dict)

    def steps(self):
        """(gpu, index, step) for every step, GPUs in ascending order."""
        for gpu in sorted(self.ranks):
            for i, step in enumerate(self.ranks[gpu]):
                yield gpu, i, step

    def overlaps(self) -> list[Overlap]:
        return [s for _, _, s in self.steps() if isinstance(s, Overlap)]


@dataclass(frozen=True)
class PipelineShape:
    """What a schedule generator needs to know about a ``pipeline`` workload.

    ``stage_devices[s]`` is the GPU of stage ``s`` in direction 0; in direction 1 stage ``s`` runs
    on ``stage_devices[stages - 1 - s]``. ``times`` are the per-phase durations in us.
    """

    stages: int
    microbatches: int
    directions: int
    stage_devices: tuple[int, ...]
    has_w: bool
    times: dict[str, float]
    send_bytes: int = 0

    @classmethod
    def of(cls, workload, schedule: str) -> "PipelineShape":
        meta = workload.meta or {}
        if meta.get("kind") != "pipeline":
            raise InputError(None, "workload.kind",
                             f"schedule {schedule} needs a pipeline workload, got {meta.get('kind', 'graph')!r}")
        times = dict(meta["times_us"])
        return cls(int(meta["stages"]), int(meta["microbatches"]), int(meta.get("directions", 1)),
                   tuple(int(d) for d in meta["stage_devices"]), "W" in times, times, int(meta.get("send_bytes", 0)))

    # -- layout -----------------------------------------------------------------------------
    def device(self, stage: int, microbatch: int) -> int:
        direction = pipeline_direction(microbatch, self.microbatches, self.directions)
        return pipeline_device(stage, direction, self.stages, self.stage_devices)

    @property
    def gpus(self) -> list[int]:
        """Distinct GPUs of the pipeline, in stage order of first appearance."""
        seen: list[int] = []
        for d in self.stage_devices:
            if d not in seen:
                seen.append(d)
        return seen

    def fail(self, schedule: str, field_name: str, reason: str):
        raise InputError(None, field_name, f"schedule {schedule}: {reason}")

    def need_directions(self, schedule: str, directions: int) -> None:
        if self.directions != directions:
            self.fail(schedule, "workload.directions", f"needs directions: {directions}, the workload has {self.directions}")

    def need_w(self, schedule: str) -> None:
        if not self.has_w:
            self.fail(schedule, "workload.times_us.W",
                      "splits the backward into B (input gradient) and W (weight gradient); the workload has no W")

    def linear(self, schedule: str) -> list[int]:
        """GPUs of a one-stage-per-GPU pipeline (stage s on the s-th distinct GPU)."""
        if len(self.gpus) != self.stages:
            self.fail(schedule, "placement.stage_devices",
                      f"needs one stage per GPU, got {self.stages} stages on {len(self.gpus)} GPUs")
        return list(self.stage_devices)

    def round_robin(self, schedule: str) -> tuple[list[int], int]:
        """(GPUs, chunks per GPU) of an interleaved layout: stage s on the GPU of stage s mod p."""
        p = len(self.gpus)
        if self.stages % p or any(self.stage_devices[s] != self.stage_devices[s % p] for s in range(self.stages)):
            self.fail(schedule, "placement.stage_devices",
                      f"needs stages placed round-robin (stage s on the GPU of stage s mod {p}), got {list(self.stage_devices)}")
        return list(self.stage_devices[:p]), self.stages // p

    def v_shape(self, schedule: str) -> list[int]:
        """GPUs of a V layout: 2q stages on q GPUs, stage s and stage 2q-1-s on GPU s."""
        n = self.stages
        q = n // 2
        if n % 2 or len(self.gpus) != q or any(self.stage_devices[s] != self.stage_devices[n - 1 - s] for s in range(n)):
            self.fail(schedule, "placement.stage_devices",
                      f"needs a V layout (2q stages on q GPUs, stage s and 2q-1-s together), got {list(self.stage_devices)}")
        return list(self.stage_devices[:q])


def v_stage_devices(gpus: list[int]) -> list[int]:
    """``stage_devices`` of the V layout over ``gpus``: down the list, then back up."""
    return list(gpus) + list(reversed(gpus))


def round_robin_stage_devices(gpus: list[int], chunks: int) -> list[int]:
    """``stage_devices`` of an interleaved layout with ``chunks`` stages per GPU."""
    return [gpus[s % len(gpus)] for s in range(len(gpus) * chunks)]
