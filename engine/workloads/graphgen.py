"""Random branchy op graphs for tests and benchmarks (``plansim gen-graph``).

Kinds:
* ``layered``: about sqrt(n) layers; each op depends on 1-3 ops of the layer before.
* ``moe``: mixture-of-experts blocks: attention -> router -> E experts in parallel -> combine,
  with the router's tokens sent to every expert (``bytes``) and back.
* ``random``: each op depends on up to 3 earlier ops chosen uniformly (a random DAG).

Durations are whole microseconds drawn uniformly from [``min_us``, ``max_us``]. The output is the
``graph`` workload JSON dict that :func:`engine.workloads.pipeline.graph_from_dict` reads.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from engine.core.errors import InputError

GRAPH_KINDS = ("layered", "moe", "random")


def generate(kind: str, n_ops: int, seed: int = 0, *, gpus: int | None = None, eligible: int | None = None,
             edge_bytes: int = 0, memory_bytes: int = 0, min_us: int = 100, max_us: int = 1000,
             experts: int = 4) -> dict[str, Any]:
    """A graph of about ``n_ops`` ops (exactly ``n_ops`` for layered and random).

    ``eligible`` (with ``gpus``) restricts each op to a random subset of that many GPUs of
    ``0..gpus-1``; otherwise ops may run on any GPU. ``edge_bytes`` is put on every edge and
    ``memory_bytes`` allocated by every op (freed when its consumers end).
    """
    if kind not in GRAPH_KINDS:
        raise InputError(None, "kind", f"unknown graph kind {kind!r}; one of {', '.join(GRAPH_KINDS)}")
    if n_ops < 1:
        raise InputError(None, "ops", f"must be >= 1, got {n_ops}")
    if eligible is not None and (gpus is None or not 1 <= eligible <= gpus):
        raise InputError(None, "eligible", "needs --gpus and 1 <= eligible <= gpus")
    if not 0 <= min_us <= max_us:
        raise InputError(None, "min_us", "needs 0 <= min_us <= max_us")
    rng = np.random.default_rng(seed)
    edges = {"layered": _layered, "moe": _moe, "random": _random}[kind](n_ops, rng, experts)
    n = 1 + max((max(u, v) for u, v in edges), default=n_ops - 1)
    n = max(n, n_ops) if kind != "moe" else n
    durations = rng.integers(min_us, max_us + 1, size=n)
    ops = []
    for i in range(n):
        op: dict[str, Any] = {"id": f"op{i}", "duration_us": int(durations[i])}
        if eligible is not None and gpus is not None:  # gpus is set whenever eligible is (checked above)
            op["devices"] = sorted(int(d) for d in rng.choice(gpus, size=eligible, replace=False))
        if memory_bytes:
            op["memory_bytes"] = int(memory_bytes)
        ops.append(op)
    out_edges = []
    for u, v in sorted(edges):
        e: dict[str, Any] = {"src": f"op{u}", "dst": f"op{v}"}
        if edge_bytes:
            e["bytes"] = int(edge_bytes)
        out_edges.append(e)
    return {"name": f"{kind}-{n}-s{seed}", "ops": ops, "edges": out_edges}


def _layered(n: int, rng: np.random.Generator, _experts: int) -> set[tuple[int, int]]:
    width = max(1, round(math.sqrt(n)))
    layers = [list(range(i, min(i + width, n))) for i in range(0, n, width)]
    edges = set()
    for prev, cur in zip(layers, layers[1:]):
        for v in cur:
            k = int(rng.integers(1, min(3, len(prev)) + 1))
            for u in rng.choice(prev, size=k, replace=False):
                edges.add((int(u), v))
    return edges


def _moe(n: int, rng: np.random.Generator, experts: int) -> set[tuple[int, int]]:
    """Blocks of ``attn -> router -> experts -> combine``; combine feeds the next block's attn."""
    block = 3 + experts
    edges = set()
    prev_combine = None
    for b in range(max(1, n // block)):
        attn, router = b * block, b * block + 1
        expert_ids = [b * block + 2 + e for e in range(experts)]
        combine = b * block + 2 + experts
        if prev_combine is not None:
            edges.add((prev_combine, attn))
        edges.add((attn, router))
        for e in expert_ids:
            edges.add((router, e))
            edges.add((e, combine))
        prev_combine = combine
    return edges


def _random(n: int, rng: np.random.Generator, _experts: int) -> set[tuple[int, int]]:
    edges = set()
    for v in range(1, n):
        k = int(rng.integers(0, min(3, v) + 1))
        for u in rng.choice(v, size=k, replace=False):
            edges.add((int(u), v))
    return edges
