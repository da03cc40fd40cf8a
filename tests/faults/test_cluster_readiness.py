"""/readyz tells the truth during a failover (issue 18, found by hand): with a master killed,
an edge answers 503 at once (its pub/sub connection to that master failed), not a probe
timeout later, which outlasted the failover, so a load balancer kept sending viewers to an
edge that could not deliver from that master's slots."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.support.cluster import RedisClusterServers
from tests.support.procs import eventually, wait_until

PROBE_INTERVAL = 1.0  # the default BROKER_PROBE_INTERVAL
# A failed connection or probe counts at once; a blackholed master takes one probe interval
# (the probe's own timeout). One more second for a shared machine.
UNREADY_WITHIN = PROBE_INTERVAL + 1.0
POLL = 0.05


async def test_readyz_is_503_from_a_master_kill_until_its_replica_serves(deploy):
    d = deploy(edges=1, workers=0, cluster=(3, 1), broker_probe_interval=PROBE_INTERVAL)
    cluster: RedisClusterServers = d.redis
    edge = d.edges[0]
    async with httpx.AsyncClient(timeout=5) as http:

        async def readyz() -> int:
            return (await http.get(edge.url + "/readyz")).status_code

        await eventually(lambda: _is(readyz, 200), 15, "/readyz 200")
        master = next(n for n in cluster.live_nodes() if cluster.role(n) == "master")
        replica = cluster.replica_of(master)
        killed_at = time.monotonic()
        master.kill()
        await eventually(lambda: _is(readyz, 503), 30, "/readyz 503")
        unready_at = time.monotonic()

        def promoted() -> bool:
            return cluster.role(replica) == "master" and cluster.healthy()

        await asyncio.to_thread(wait_until, promoted, 30, "the replica's promotion")
        promoted_at = time.monotonic()
        await eventually(lambda: _is(readyz, 200), 15, "/readyz 200 after the failover")
        ready_at = time.monotonic()
    print(f"master killed: /readyz 503 after {unready_at - killed_at:.2f} s, replica promoted "
          f"after {promoted_at - killed_at:.2f} s, /readyz 200 after {ready_at - killed_at:.2f} s")
    assert unready_at - killed_at <= UNREADY_WITHIN
    assert unready_at < promoted_at  # unready while nobody served the dead master's slots


async def _is(readyz, code: int) -> bool:
    return await readyz() == code
