"""The torchtitan settings that pair with an exported torch-csv schedule, and the layouts it can build.

What this relies on (torchtitan ``torchtitan/distributed/pipeline_parallel.py`` and PyTorch
``torch/distributed/pipelining/schedules.py``):

* With ``parallelism.pipeline_parallel_schedule_csv`` set, torchtitan runs the CSV in
  ``_PipelineScheduleRuntime`` (``build_pipeline_schedule``), which infers the stage of each
  rank from the rows (``_validate_schedule``). But *which stages each rank builds* still comes
  from ``parallelism.pipeline_parallel_schedule`` (``pipeline_module_split``): ``"v"`` style for
  ``ZBVZeroBubble`` and ``DualPipeV`` (rank ``r`` holds stages ``r`` and ``2p-1-r``, exactly two
  per rank), ``"loop"`` for every other name (rank ``r`` holds ``r, r+p, r+2p, ...``). A CSV whose
  layout differs from the one built sends activations to ranks that never receive them:
  torchtitan hangs rather than failing, so :func:`check_schedule_name` refuses the pair.
* Stages per rank: 1 for a ``PipelineScheduleSingle`` name (``1F1B``, ``GPipe``), else 2 unless
  ``pipeline_parallel_layers_per_stage`` says otherwise (``pipeline_llm``, which refuses a
  single-stage name with several stages per rank and a multi-stage name with one).
* Micro-batches: ``training.local_batch_size // parallelism.pipeline_parallel_microbatch_size``
  per data-parallel rank; the CSV must name each stage's ``F`` exactly that many times.
* Layers: ``generate_llm_fqn_per_model_part`` splits ``layers`` evenly over the stages after
  counting the embedding and the output as ``pipeline_parallel_first_stage_less_layers`` /
  ``..._last_stage_less_layers`` layers (default 1 each); plansim's transformer splits the layers
  evenly with the embedding on stage 0 and the output on the last, which both set to 0 reproduce.
* ``OVERLAP_F_B`` cells: the CSV runtime runs the pair's forward and backward one after the
  other unless a custom function is registered for it, and torchtitan registers its overlap
  callback only on its own ``ScheduleDualPipeV`` class (with
  ``pipeline_parallel_expert_parallel_overlap``), never on a CSV schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.errors import InputError
from engine.planners.schedules.torch_csv import Cell

# torchtitan / PyTorch schedule name (get_schedule_class) -> (stage style, stages per rank: 1, or 0 for "2 or more")
SCHEDULE_STYLES: dict[str, tuple[str, int]] = {
    "1F1B": ("loop", 1), "GPipe": ("loop", 1),
    "Interleaved1F1B": ("loop", 0), "LoopedBFS": ("loop", 0), "InterleavedZeroBubble": ("loop", 0),
    "ZBVZeroBubble": ("v", 2), "DualPipeV": ("v", 2),
}


@dataclass(frozen=True)
class CsvLayout:
    """Where an exported CSV puts its stages: ``ranks`` rows, ``stages`` stages, ``style`` loop or
    v, ``microbatches`` forwards per stage, ``overlap_pairs`` OVERLAP_F_B cells."""

    ranks: int
    stages: int
    style: str
    microbatches: int
    overlap_pairs: int

    @property
    def stages_per_rank(self) -> int:
        return self.stages // self.ranks


@dataclass(frozen=True)
class TorchtitanSettings:
    """The torchtitan config keys (section.key -> value) to run an exported CSV, and notes."""

    settings: dict[str, object]
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"{k} = {v}" for k, v in self.settings.items()] + [f"note: {n}" for n in self.notes]


def csv_layout(rows: list[list[Cell]], field_name: str = "placement.stage_devices") -> CsvLayout:
    """The layout of ``rows`` (:func:`engine.planners.schedules.torch_csv.read_torch_csv`); one
    :class:`InputError` on ``field_name`` when it is neither torchtitan's loop nor its V."""
    p = len(rows)
    rank_of: dict[int, int] = {}
    forwards: dict[int, int] = {}
    pairs = 0
    for r, row in enumerate(rows):
        for cell in row:
            pairs += len(cell) == 2
            for stage, kind, _ in cell:
                rank_of.setdefault(stage, r)
                forwards[stage] = forwards.get(stage, 0) + (kind == "F")
    n = len(rank_of)
    loop = n % p == 0 and all(rank_of.get(s) == s % p for s in range(n))
    v = n == 2 * p and all(rank_of.get(s) == (s if s < p else 2 * p - 1 - s) for s in range(n))
    if not (loop or v):
        where = ", ".join(f"stage {s} on rank {rank_of[s]}" for s in sorted(rank_of))
        raise InputError(None, field_name,
                         f"torchtitan builds stages looped (rank r holds r, r+{p}, ...) or in a V (rank r holds r and "
                         f"{2 * p - 1}-r); this plan has {where}")
    counts = set(forwards.values())
    if len(counts) != 1:
        raise InputError(None, "order", f"stages run different numbers of forwards ({sorted(counts)})")
    return CsvLayout(p, n, "loop" if loop else "v", counts.pop(), pairs)


def default_schedule_name(layout: CsvLayout) -> str:
    """The torchtitan schedule name whose stage layout is ``layout``'s: ``1F1B`` (loop, one stage
    per rank), ``Interleaved1F1B`` (loop, several), ``ZBVZeroBubble`` (V)."""
    if layout.style == "v":
        return "ZBVZeroBubble"
    return "1F1B" if layout.stages_per_rank == 1 else "Interleaved1F1B"


def check_schedule_name(name: str, layout: CsvLayout, field_name: str = "--torchtitan-schedule") -> str:
    """``name`` spelled as torchtitan lists it, when the stages it builds are ``layout``'s; else one
    :class:`InputError` (torchtitan would hang or refuse the stage count)."""
    known = {k.lower(): k for k in SCHEDULE_STYLES}
    canonical = known.get(name.lower())
    if canonical is None:
        raise InputError(None, field_name, f"unknown torchtitan schedule {name!r}; one of {', '.join(SCHEDULE_STYLES)}")
    style, per_rank = SCHEDULE_STYLES[canonical]
    k = layout.stages_per_rank
    if style != layout.style:
        built = "in a V (rank r holds r and 2p-1-r)" if style == "v" else "looped (rank r holds r, r+p, ...)"
        raise InputError(None, field_name,
                         f"{canonical} builds stages {built} but the CSV places them "
                         f"{'in a V' if layout.style == 'v' else 'looped'}: torchtitan "
                         f"would wait forever on sends no rank makes; use {default_schedule_name(layout)}")
    if (per_rank == 1 and k != 1) or (per_rank == 0 and k < 2) or (per_rank == 2 and k != 2):
        need = {1: "exactly 1", 0: "2 or more", 2: "exactly 2"}[per_rank]
        raise InputError(None, field_name, f"{canonical} builds {need} stages per rank, the CSV has {k}; "
                                           f"use {default_schedule_name(layout)}")
    return canonical


def torchtitan_settings(layout: CsvLayout, csv_path: str, name: str | None = None, micro_batch: int | None = None,
                        layers: int | None = None) -> TorchtitanSettings:
    """The settings to pair with the CSV at ``csv_path`` (module docstring). ``micro_batch``
    (sequences per micro-batch) and ``layers`` come from a transformer workload; without them the
    local batch size is given as a multiple of the micro-batch size."""
    schedule = check_schedule_name(name, layout) if name else default_schedule_name(layout)
    out: dict[str, object] = {
        "parallelism.pipeline_parallel_degree": layout.ranks,
        "parallelism.pipeline_parallel_schedule": schedule,
        "parallelism.pipeline_parallel_schedule_csv": csv_path,
    }
    m = layout.microbatches
    if micro_batch is not None:
        out["parallelism.pipeline_parallel_microbatch_size"] = micro_batch
        out["training.local_batch_size"] = micro_batch * m
    else:
        out["training.local_batch_size"] = f"{m} x parallelism.pipeline_parallel_microbatch_size"
    if layers is not None:
        out["parallelism.pipeline_parallel_layers_per_stage"] = layers // layout.stages
        out["parallelism.pipeline_parallel_first_stage_less_layers"] = 0
        out["parallelism.pipeline_parallel_last_stage_less_layers"] = 0
    notes = [f"{m} micro-batches per data-parallel rank (local_batch_size / pipeline_parallel_microbatch_size)"]
    if layout.overlap_pairs:
        notes.append(f"{layout.overlap_pairs} OVERLAP_F_B pairs run forward then backward, one after the other: "
                     "torchtitan registers its overlap callback only on its own DualPipeV schedule, not on a CSV")
    return TorchtitanSettings(out, notes)
