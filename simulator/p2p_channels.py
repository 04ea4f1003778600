"""How many NCCL channels a point-to-point connection to another node gets, and the rate that buys.

NCCL moves data in *channels*; a network connection is driven by a fixed number of channels per
NIC (``comm.net_channels_per_nic``, ``c``; 2 is NCCL's own default, not a fitted value), so one
channel moves at most ``NIC effective bandwidth / c``. Collective rings see every channel of
the communicator; a send/recv to a peer on another node does not: NCCL hands each peer a share of
the channels, and the more ranks there are the fewer each peer gets. Modelled as in recent NCCL
with ``NCCL_NCHANNELS_PER_NET_PEER`` unset:

* the communicator's collective channels: ``c x`` the NICs it drives per node (on each node
  ``min(its GPUs there, node NICs)``, the largest over its nodes); its p2p channel budget is that
  number rounded up to a power of two;
* a peer across nodes starts with ``k = c`` channels (enough for a whole NIC) and ``k`` is halved,
  down to 1, while ``k x ranks`` exceeds four times the p2p budget (NCCL keeps the number of
  p2p operations in flight per channel bounded);
* so the connection moves at most ``k x NIC effective bandwidth / c`` (bytes/us): a whole NIC
  for a node pair, half a NIC for 10 ranks on 10 nodes (nccl-tests sendrecv measures 25-26
  GB/s per rank there, against 39-44 GB/s for a pair).

``c = 0`` switches the rule off (no cap). A large ``c`` does not: a pair still gets a whole NIC,
and a large group about ``4 x NICs / ranks`` of one (``c = 2`` stops halving at one channel, half a
NIC; ``c = 4`` reaches a quarter for 10 ranks). Connections inside a node (NVLink) are not capped.
Units: bytes/us.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from hardware_profiles import Cluster



def pow2_up(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def nics_per_node(cluster: Cluster, ranks: Sequence[int]) -> int:
    """NICs the group drives on its busiest node: per node ``min(its GPUs there, node NICs)``."""
    count: dict[int, int] = {}
    for g in ranks:
        n = cluster.node_of(g)
        count[n] = count.get(n, 0) + 1
    return min(max(count.values(), default=0), cluster.profile.node.nics)


def peer_channels(nranks: int, coll_channels: int, per_nic: int) -> int:
    """Channels of one cross-node p2p connection in a communicator of ``nranks`` ranks with
    ``coll_channels`` collective channels, NICs driven by ``per_nic`` channels each."""
    budget = pow2_up(coll_channels)
    k = per_nic
    while k > 1 and k * nranks > 4 * budget:
        k //= 2
    return max(k, 1)


def connection_cap(cluster: Cluster, ranks: Sequence[int]) -> float:
    """The most one cross-node p2p connection of the group ``ranks`` moves (bytes/us); ``inf``
    when ``comm.net_channels_per_nic`` is 0 (rule off) or the group sits in one node."""
    per_nic = getattr(cluster.profile.comm, "net_channels_per_nic", 0)
    if per_nic <= 0 or len({cluster.node_of(g) for g in ranks}) < 2:
        return math.inf
    k = peer_channels(len(ranks), per_nic * nics_per_node(cluster, ranks), per_nic)
    node = cluster.profile.node
    return k * node.nic_bytes_per_us * node.nic_efficiency / per_nic
