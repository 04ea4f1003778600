"""What the engine asks of a cluster: the typed join between planners and a cluster model.

:class:`hardware_profiles.Cluster` (built from a profile) is the cluster plansim runs on; tests
use small stand-ins. Both satisfy :class:`ClusterView`, so the core and the planners depend on
this protocol, not on the loader. Times in us, sizes in bytes.
"""

from __future__ import annotations

from typing import Protocol


class ClusterView(Protocol):
    """GPUs ``0..n_gpus-1`` of one GPU model, their memory, and contention-free transfers."""

    @property
    def n_gpus(self) -> int: ...

    @property
    def gpu_model(self) -> str | None: ...

    def memory_cap_bytes(self, device: int) -> int:
        """The GPU's memory in bytes."""
        ...

    def transfer_time(self, src: int, dst: int, nbytes: int) -> float:
        """Contention-free time (us) to move ``nbytes`` from GPU ``src`` to GPU ``dst``."""
        ...

    def route_class(self, src: int, dst: int) -> str:
        """The bottleneck link class of the route (``nvlink``, ``nic``, ``spine``, ...)."""
        ...


class DelayModel(Protocol):
    """Communication delay of an edge placed on two GPUs (us): :class:`engine.core.comm.CommModel`
    and its precomputed :class:`engine.core.delay_table.DelayTable`."""

    def delay(self, src_op: str, dst_op: str, src_dev: int, dst_dev: int, nbytes: int) -> float: ...
