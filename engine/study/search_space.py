"""The search space of ``plansim search``: parallel configurations of one transformer on N GPUs.

A configuration is a :class:`Config`: the factorisation ``tp x pp x dp (x cp) = N`` GPUs (TP inside
a node), the virtual stages ``vpp``, the micro-batch size, activation recompute, the pipeline
schedule, and whatever other parallelism fields the transformer workload accepts
(:data:`engine.workloads.transformer.PARALLELISM_KEYS`: ``cp``, ``ep``, ``sp``, ``fsdp`` once it
has them; a field the workload does not know stays at its neutral value and cannot be searched).

The default space (:func:`default_space`) is every divisor factorisation with ``tp`` dividing the
GPUs per node, ``vpp`` in {1, 2}, micro-batch sizes {1, 2, 4}, every recompute mode, and the
schedules of the library whose layout the transformer builds (``dualpipe``'s two directions it
does not): one stage per rank (gpipe, 1f1b, zb-h1, zb-h2) with ``vpp = 1``, interleaved with
``vpp >= 2``, the V schedules (zb-v, dualpipev) with ``vpp = 2``; with ``pp = 1`` only 1F1B (one
stage has no pipeline order to choose). A ``--space`` YAML narrows or widens it: a list of values
per field (:data:`SPACE_FIELDS`); a field it omits keeps its default values.

Which configurations the model accepts (heads over tp, layers over pp x vpp, the batch over
micro-batch x dp, the schedule's micro-batch rule) is the workload's and the schedule library's
to say: :mod:`engine.study.search_model` asks them and counts each refusal by field.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from engine.core.documents import load_yaml
from engine.core.errors import InputError, nearest
from engine.planners.schedules.library import LAYOUTS
from engine.workloads.pipeline import SCHEDULE_NAMES
from engine.workloads.transformer import PARALLELISM_KEYS
from engine.workloads.transformer_costs import RECOMPUTE

# field -> its neutral value (what a configuration has when the field is not searched)
NEUTRAL: dict[str, Any] = {"tp": 1, "pp": 1, "dp": 1, "vpp": 1, "cp": 1, "ep": 1, "sp": False, "fsdp": False,
                           "micro_batch": 1, "recompute": "none", "schedule": "1f1b"}
SPACE_FIELDS = tuple(NEUTRAL)
INT_FIELDS = ("tp", "pp", "dp", "vpp", "cp", "ep", "micro_batch")
BOOL_FIELDS = ("sp", "fsdp")
# schedules whose layout the transformer workload builds (one direction)
SCHEDULES = tuple(s for s in SCHEDULE_NAMES if LAYOUTS[s][2] == 1)
DEFAULT_MICRO_BATCHES = (1, 2, 4)
DEFAULT_VPP = (1, 2)


@dataclass(frozen=True, order=True)
class Config:
    """One parallel configuration (GPU counts per dimension, micro-batch size in sequences)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1
    cp: int = 1
    ep: int = 1
    sp: bool = False
    fsdp: bool = False
    micro_batch: int = 1
    recompute: str = "none"
    schedule: str = "1f1b"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        return cls(**{k: d[k] for k in SPACE_FIELDS if k in d})

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def label(self) -> str:
        """A short name people read: ``tp8 pp4 dp2 vpp2 mb1 selective interleaved``."""
        parts = [f"tp{self.tp}", f"pp{self.pp}", f"dp{self.dp}"]
        parts += [f"vpp{self.vpp}"] if self.vpp > 1 else []
        parts += [f"cp{self.cp}"] if self.cp > 1 else []
        parts += [f"ep{self.ep}"] if self.ep > 1 else []
        parts += ["sp"] if self.sp else []
        parts += ["fsdp"] if self.fsdp else []
        return " ".join(parts + [f"mb{self.micro_batch}", self.recompute, self.schedule])


def searchable() -> tuple[str, ...]:
    """The fields a search may vary: the batch and schedule fields, and every parallelism field the
    transformer workload accepts."""
    return tuple(f for f in SPACE_FIELDS if f in ("micro_batch", "recompute") or f in PARALLELISM_KEYS)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_space(gpus: int, gpus_per_node: int) -> dict[str, list[Any]]:
    """Per searchable field, its default values for ``gpus`` GPUs with ``gpus_per_node`` per node
    (module docstring). ``pp``/``dp`` are derived per ``tp`` by :func:`configs`, so not listed."""
    fields = searchable()
    space: dict[str, list[Any]] = {
        "tp": [t for t in divisors(gpus_per_node) if gpus % t == 0],
        "vpp": list(DEFAULT_VPP), "micro_batch": list(DEFAULT_MICRO_BATCHES), "recompute": list(RECOMPUTE),
        "schedule": list(SCHEDULES)}
    if "cp" in fields:
        space["cp"] = [c for c in divisors(gpus) if c <= gpus_per_node]
    for f in BOOL_FIELDS:
        if f in fields:
            space[f] = [False, True]
    return space


def load_space(path: Path | None, gpus: int, gpus_per_node: int) -> dict[str, list[Any]]:
    """The default space with the lists of a ``--space`` YAML file put in (errors name the file and field)."""
    space = default_space(gpus, gpus_per_node)
    if path is None:
        return space
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise InputError(path, None, "a search space is a mapping of field: [values]")
    fields = searchable()
    for key, values in data.items():
        key = str(key)
        if key not in SPACE_FIELDS:
            raise InputError(path, key, "unknown field" + nearest(key, SPACE_FIELDS))
        if key not in fields:
            raise InputError(path, key, f"the transformer workload has no parallelism.{key} yet; searchable: {', '.join(fields)}")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise InputError(path, key, "empty list: give at least one value")
        space[key] = [_check_value(path, key, v, gpus, gpus_per_node) for v in values]
    return space


def _check_value(path: Path, key: str, v: Any, gpus: int, gpus_per_node: int) -> Any:
    """One value of a ``--space`` list, refused when no configuration could hold it."""
    if key in INT_FIELDS:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(path, key, f"must be integers >= 1, got {v!r}")
        if key in ("tp", "pp", "dp", "cp") and gpus % v:
            raise InputError(path, key, f"{key}={v} does not divide the {gpus} GPUs")
        if key == "tp" and gpus_per_node % v:
            raise InputError(path, key, f"tp={v} does not fit in a node of {gpus_per_node} GPUs (tensor parallelism stays inside a node)")
        return v
    if key in BOOL_FIELDS:
        if not isinstance(v, bool):
            raise InputError(path, key, f"must be true or false, got {v!r}")
        return v
    choices = RECOMPUTE if key == "recompute" else SCHEDULES
    if v not in choices:
        hint = " (dualpipe runs two model replicas, which the transformer workload does not build)" if v == "dualpipe" else ""
        raise InputError(path, key, f"must be one of {', '.join(choices)}, got {v!r}{hint}")
    return v


def _vpp_fits(schedule: str, vpp: int, pp: int) -> bool:
    """The layouts the transformer builds: linear vpp 1, round-robin vpp >= 2, V vpp 2; pp 1: 1F1B only."""
    if pp == 1:
        return schedule == "1f1b" and vpp == 1
    layout = LAYOUTS[schedule][0]
    return vpp == 1 if layout == "linear" else (vpp >= 2 if layout == "round_robin" else vpp == 2)


def configs(space: dict[str, list[Any]], gpus: int) -> Iterator[Config]:
    """Every configuration of ``space`` whose dimensions multiply to ``gpus`` and whose schedule's
    layout the transformer builds, in a fixed order (tp, pp, then the other fields)."""
    pp_given = space.get("pp")
    dp_given = space.get("dp")
    for tp, cp in itertools.product(space["tp"], space.get("cp", [1])):
        if gpus % (tp * cp):
            continue
        rest = gpus // (tp * cp)
        for pp in (pp_given if pp_given is not None else divisors(rest)):
            if rest % pp or (dp_given is not None and rest // pp not in dp_given):
                continue
            dp = rest // pp
            eps = space.get("ep", [1])
            for ep, vpp, sched, mb, rc, sp, fsdp in itertools.product(
                    eps, space["vpp"], space["schedule"], space["micro_batch"], space["recompute"],
                    space.get("sp", [False]), space.get("fsdp", [False])):
                if dp % ep or not _vpp_fits(sched, vpp, pp):
                    continue
                yield Config(tp=tp, pp=pp, dp=dp, vpp=vpp, cp=cp, ep=ep, sp=sp, fsdp=fsdp, micro_batch=mb,
                             recompute=rc, schedule=sched)
