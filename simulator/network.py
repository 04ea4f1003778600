"""Flows on the cluster's links, shared max-min fairly, re-computed when a flow starts or ends.

A *flow* here is a bundle of sub-flows that move in lock-step: one point-to-point transfer is a
bundle of one; a collective step (every ring hop of every channel) or a transfer together with
its symmetric images is a bundle of many. Each sub-flow carries ``nbytes``; a bundle crosses
link ``l`` with weight ``w_l`` (how many of its sub-flows cross ``l``, or a byte-weighted share)
and all its sub-flows progress at one rate ``r`` (bytes/us per sub-flow), so it loads ``l`` with
``w_l * r``. Rates are the weighted max-min fair allocation (progressive filling): raise every
rate together; when a link fills, the bundles on it keep the rate they have; carry on with the
rest. A bundle alone on the network gets ``min_l bandwidth_l / w_l``: for a single sub-flow that
is the route's bottleneck bandwidth, so a lone transfer takes exactly ``nbytes / bottleneck``.

What keeps the event loop lean: rates are re-computed only for the bundles coupled to the one
that started or ended, through links that can bind. A link *can bind* when the bundles on it,
each at its stand-alone rate, would exceed its capacity; a link that cannot bind constrains no
allocation, so bundles that only share such links do not affect each other. A bundle whose rate
does not change keeps its scheduled completion (no float drift when unrelated flows come and go).

*Connection caps*: a bundle may also be held to a rate per connection that is not a share of any
link (NCCL channels of a point-to-point connection, :mod:`simulator.p2p_channels`).
:meth:`Network.connection` gives such a connection a *private link* (created on first use, its
capacity the cap) that the bundle crosses with weight 1 per sub-flow on it; the fair allocation
then honours link shares and caps alike, and transfers on one connection share its cap. Private
links carry no bytes of their own: :attr:`Network.names`, :attr:`Network.bytes` and everything
indexed by them cover the real links only (private ids come after them).

Units: bytes, us, bytes/us. Links are ``(u, v)`` node-name pairs of ``Cluster.topology``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable, Sequence

_BIND_TOL = 1e-9  # a link whose demand is within this share of its capacity counts as able to bind


class Flow:
    """One bundle in flight. ``rate`` is per sub-flow (bytes/us); ``remaining`` per sub-flow (bytes)."""

    __slots__ = ("fid", "links", "weights", "nbytes", "remaining", "rate", "t_last", "version", "solo",
                 "on_done", "started")

    def __init__(self, fid: int, links: tuple[int, ...], weights: tuple[float, ...], nbytes: float,
                 solo: float, on_done: Callable[[], object] | None, now: float):
        self.fid = fid
        self.links = links
        self.weights = weights
        self.nbytes = nbytes
        self.remaining = float(nbytes)
        self.rate = 0.0
        self.t_last = now
        self.version = 0
        self.solo = solo
        self.on_done = on_done
        self.started = now


class Network:
    """The links of a cluster and the bundles crossing them, inside a SimPy environment.

    ``links``: directed link names; ``bandwidth``: bytes/us per link (effective). Per link it
    keeps the bytes carried, the peak number of concurrent sub-flows and, if ``timeline``, the
    utilisation over time as ``(time_us, share)`` steps.
    """

    def __init__(self, env, links: Sequence[tuple[str, str]], bandwidth: Sequence[float], timeline: bool = False):
        self.env = env
        self.names = list(links)
        self.index = {l: i for i, l in enumerate(self.names)}
        self.cap = [float(b) for b in bandwidth]
        self.bind_at = [c * (1.0 - _BIND_TOL) for c in self.cap]
        n = len(self.names)
        self.on_link: list[dict[Flow, float]] = [{} for _ in range(n)]
        self.demand = [0.0] * n  # sum over bundles of weight x stand-alone rate
        self.load = [0.0] * n  # sum over bundles of weight x current rate (kept for the timeline only)
        self.subflows = [0.0] * n
        self._carried: dict[tuple, float] = {}  # (links, weights) -> bytes per sub-flow, summed
        self.peak_subflows = [0.0] * n
        self.timeline: list[list[tuple[float, float]]] | None = [[] for _ in range(n)] if timeline else None
        self._next_id = 0
        self.active = 0
        self.recomputes = 0
        self._private: dict[tuple[int, int, float], int] = {}  # (src GPU, dst GPU, cap) -> link id

    # -- public ---------------------------------------------------------------------------------
    @property
    def bytes(self) -> list[float]:
        """Bytes carried per link so far (summed per distinct bundle, then spread on its links)."""
        n = len(self.names)
        out = [0.0] * n
        for (links, weights), nbytes in self._carried.items():
            for l, w in zip(links, weights):
                if l < n:  # private links (connection caps) are not links of the cluster
                    out[l] += w * nbytes
        return out

    def connection(self, src: int, dst: int, cap: float) -> int:
        """The id of the private link of the connection ``src -> dst`` (GPUs) held to ``cap``
        bytes/us, created on first use. Transfers between the same GPUs with the same cap are one
        connection (one communicator's channels) and share it."""
        key = (src, dst, float(cap))
        hit = self._private.get(key)
        if hit is None:
            hit = self._private[key] = len(self.cap)
            self.cap.append(float(cap))
            self.bind_at.append(float(cap) * (1.0 - _BIND_TOL))
            for column in (self.demand, self.load, self.subflows, self.peak_subflows):
                column.append(0.0)
            self.on_link.append({})
            if self.timeline is not None:
                self.timeline.append([])
        return hit

    def account(self, links: tuple[int, ...], weights: tuple[float, ...], nbytes: float) -> None:
        """Count ``nbytes`` per sub-flow as carried on ``links`` (flows count themselves)."""
        key = (links, weights)
        self._carried[key] = self._carried.get(key, 0.0) + nbytes

    def link_ids(self, links: Iterable[tuple[str, str]]) -> list[int]:
        return [self.index[l] for l in links]

    def solo_rate(self, links: Sequence[int], weights: Sequence[float]) -> float:
        """Rate (bytes/us per sub-flow) of a bundle alone on the network."""
        return min(self.cap[l] / w for l, w in zip(links, weights))

    def transfer(self, links: Sequence[int], weights: Sequence[float], nbytes: float, latency_us: float,
                 on_done: Callable[[], object], solo: float | None = None) -> None:
        """After ``latency_us``, move ``nbytes`` per sub-flow over ``links``; then call ``on_done``.

        ``solo``: the bundle's stand-alone rate if the caller has it cached."""
        if latency_us > 0:
            ev = self.env.timeout(latency_us)
            ev.callbacks.append(partial(self._latency_over, links, weights, nbytes, on_done, solo))
        else:
            self.start(links, weights, nbytes, on_done, solo)

    def _latency_over(self, links, weights, nbytes, on_done, solo, _ev) -> None:
        self.start(links, weights, nbytes, on_done, solo)

    def start(self, links: Sequence[int], weights: Sequence[float], nbytes: float,
              on_done: Callable[[], object] | None, solo: float | None = None) -> Flow | None:
        """Start a bundle now (no latency). A bundle with no bytes or no links ends at once."""
        if nbytes <= 0 or not links:
            if on_done is not None:
                on_done()
            return None
        if type(links) is not tuple or type(weights) is not tuple:
            links, weights = tuple(links), tuple(float(w) for w in weights)
        now = self.env.now
        if solo is None:
            solo = self.solo_rate(links, weights)
        flow = Flow(self._next_id, links, weights, nbytes, solo, on_done, now)
        self._next_id += 1
        self.active += 1
        on_link, demand, subflows, peak = self.on_link, self.demand, self.subflows, self.peak_subflows
        key = (links, weights)
        self._carried[key] = self._carried.get(key, 0.0) + nbytes
        alone = True
        for l, w in zip(links, weights):
            here = on_link[l]
            if here:
                alone = False
            here[flow] = w
            demand[l] += w * solo
            n = subflows[l] = subflows[l] + w
            if n > peak[l]:
                peak[l] = n
        if alone:  # nobody to share with: the stand-alone rate, no re-allocation needed
            self._set_rate(flow, solo, now)
            if self.timeline is not None:
                for l in links:
                    self._mark(l, now)
        else:
            self._reallocate([flow], ())
        return flow

    def _set_rate(self, f: Flow, new: float, now: float) -> None:
        """Give ``f`` a new rate from ``now`` on and schedule its completion."""
        if f.rate > 0:
            f.remaining -= f.rate * (now - f.t_last)
        f.t_last = now
        if self.timeline is not None:
            load, delta = self.load, new - f.rate
            for l, w in zip(f.links, f.weights):
                load[l] += w * delta
        f.rate = new
        f.version += 1
        rem = f.remaining
        self.env.timeout(rem / new if rem > 0 else 0.0).callbacks.append(partial(self._on_timer, f, f.version))

    # -- internals ------------------------------------------------------------------------------
    def _component(self, seeds: Iterable[Flow], seed_links: Iterable[int]) -> list[Flow]:
        """Bundles coupled to ``seeds`` (and to every bundle on ``seed_links``) through links that can bind.

        Insertion-ordered, so the order (and every float sum below) is the same run to run."""
        demand, bind_at, on_link = self.demand, self.bind_at, self.on_link
        seen: dict[Flow, None] = {}
        stack = list(seeds)
        for l in seed_links:
            stack.extend(on_link[l])
        seen_links: set[int] = set()
        while stack:
            f = stack.pop()
            if f in seen:
                continue
            seen[f] = None
            for l in f.links:
                if l not in seen_links and demand[l] >= bind_at[l]:
                    seen_links.add(l)
                    stack.extend(g for g in on_link[l] if g not in seen)
        return list(seen)

    def _fair_rates(self, flows: list[Flow]) -> dict[Flow, float]:
        """Weighted progressive filling over the links of ``flows`` that can bind."""
        if len(flows) == 1:  # alone on every link that can bind: its stand-alone rate
            return {flows[0]: flows[0].solo}
        demand, bind_at, cap = self.demand, self.bind_at, self.cap
        residual: dict[int, float] = {}
        weight: dict[int, float] = {}
        for f in flows:
            for l, w in zip(f.links, f.weights):
                if demand[l] >= bind_at[l]:
                    residual[l] = cap[l]
                    weight[l] = weight.get(l, 0.0) + w
        rates: dict[Flow, float] = {}
        left = len(flows)
        while left:
            best_l, best = -1, float("inf")
            for l, w in weight.items():
                if w > 1e-12:
                    share = residual[l] / w if residual[l] > 0 else 0.0
                    if share < best:
                        best_l, best = l, share
            if best_l < 0:  # only links that cannot bind are left: stand-alone rates
                for f in flows:
                    if f not in rates:
                        rates[f] = f.solo
                break
            for f in self.on_link[best_l]:
                if f in rates:
                    continue
                rates[f] = best
                left -= 1
                for l, w in zip(f.links, f.weights):
                    if l in weight:
                        residual[l] -= w * best
                        weight[l] -= w
            del weight[best_l]
        return rates

    def _reallocate(self, seeds: Iterable[Flow], seed_links: Iterable[int]) -> None:
        self.recomputes += 1
        comp = self._component(seeds, seed_links)
        if not comp:
            return
        rates = self._fair_rates(comp)
        now = self.env.now
        touched: set[int] | None = set() if self.timeline is not None else None
        for f in comp:
            new = rates[f]
            if new != f.rate:
                self._set_rate(f, new, now)
                if touched is not None:
                    touched.update(f.links)
        if touched:
            for l in sorted(touched):
                self._mark(l, now)

    def _mark(self, l: int, now: float) -> None:
        if self.timeline is None:
            raise RuntimeError("Network._mark needs a timeline (callers mark only when one is kept)")
        share = max(0.0, min(1.0, self.load[l] / self.cap[l])) if self.on_link[l] else 0.0
        tl = self.timeline[l]
        if tl and tl[-1][0] == now:
            tl[-1] = (now, share)
        elif not tl or tl[-1][1] != share:
            tl.append((now, share))

    def _on_timer(self, flow: Flow, version: int, _ev) -> None:
        if version != flow.version:
            return  # the bundle was re-rated after this completion was scheduled
        self.active -= 1
        now = self.env.now
        on_link, demand, load, subflows = self.on_link, self.demand, self.load, self.subflows
        timeline = self.timeline is not None
        busy = False
        for l, w in zip(flow.links, flow.weights):
            here = on_link[l]
            del here[flow]
            if here:
                busy = True
                demand[l] -= w * flow.solo
                subflows[l] -= w
                if timeline:
                    load[l] -= w * flow.rate
            else:  # idle link: no float residue
                demand[l] = load[l] = subflows[l] = 0.0
            if timeline:
                self._mark(l, now)
        flow.version += 1
        if busy:
            self._reallocate((), flow.links)
        if flow.on_done is not None:
            flow.on_done()
