"""Communication delays for every GPU pair, precomputed so list schedulers can ask millions of times.

:class:`engine.core.comm.CommModel` delays are ``latency + bytes / bandwidth`` per route (times a per
class scale): affine in the size. :class:`DelayTable` measures each ordered GPU pair's
``lat[a][b]`` (us) and ``inv[a][b]`` (us per byte) from three sizes, checks the three agree with
one line (else it falls back to asking the model, with a cache), and answers
``delay(src_op, dst_op, a, b, nbytes)`` exactly as ``CommModel.delay`` does (times the per-edge
contention factor; 0 on one GPU or for zero bytes) up to float rounding.
"""

from __future__ import annotations

from engine.core.comm import CommModel

_SIZES = (1, 1 << 20, 1 << 30)  # bytes: three points to fit and check the line
_AFFINE_RTOL = 1e-9


class DelayTable:
    def __init__(self, comm: CommModel, n_gpus: int):
        self.comm = comm
        self.n = int(n_gpus)
        self.edge_scale: dict[tuple[str, str], float] = dict(getattr(comm, "edge_scale", {}) or {})
        n = self.n
        self.lat = [[0.0] * n for _ in range(n)]
        self.inv = [[0.0] * n for _ in range(n)]
        self.affine = True
        s0, s1, s2 = _SIZES
        for a in range(n):
            for b in range(n):
                if a == b:
                    continue
                t0, t1, t2 = (comm.route_delay(a, b, s) for s in _SIZES)
                slope = (t2 - t0) / (s2 - s0)
                lat = t0 - s0 * slope
                self.lat[a][b], self.inv[a][b] = lat, slope
                if abs(lat + s1 * slope - t1) > _AFFINE_RTOL * max(1.0, abs(t1)):
                    self.affine = False
        pairs = n * (n - 1)
        self.mean_lat = sum(map(sum, self.lat)) / pairs if pairs else 0.0
        self.mean_inv = sum(map(sum, self.inv)) / pairs if pairs else 0.0
        self._cache: dict[tuple[int, int, int], float] = {}

    def route(self, a: int, b: int, nbytes: int) -> float:
        """Modelled delay (us) of ``nbytes`` from GPU ``a`` to GPU ``b`` (no per-edge data)."""
        if a == b or nbytes <= 0:
            return 0.0
        if self.affine:
            return self.lat[a][b] + nbytes * self.inv[a][b]
        key = (a, b, nbytes)
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = self.comm.route_delay(a, b, nbytes)
        return t

    def delay(self, src_op: str, dst_op: str, a: int, b: int, nbytes: int) -> float:
        """Same as ``CommModel.delay``: delay (us) of edge ``src_op -> dst_op`` placed ``a -> b``."""
        if a == b or nbytes <= 0:
            return 0.0
        t = self.route(a, b, nbytes)
        return t * self.edge_scale.get((src_op, dst_op), 1.0) if self.edge_scale else t

    def mean(self, nbytes: int) -> float:
        """Mean delay (us) of ``nbytes`` over ordered pairs of distinct GPUs (HEFT's average)."""
        if nbytes <= 0 or self.n < 2:
            return 0.0
        return self.mean_lat + nbytes * self.mean_inv
