"""broker.core.cluster.SlotMap, the edge's one view of a Redis Cluster's slot map, against a
real three-master cluster: who the masters are, who serves a key (as the cluster itself says
with CLUSTER SLOTS), a connection of one's own to a master, and the guard around the one
redis-py internal it uses."""

from __future__ import annotations

import logging
import types

import pytest
import redis.asyncio as aioredis

from broker.core import protocol
from broker.core.cluster import SlotMap
from tests.support.cluster import RedisClusterServers


async def test_the_slot_map_agrees_with_the_cluster(redis_cluster: RedisClusterServers):
    client = aioredis.RedisCluster.from_url(redis_cluster.url.replace("+cluster", "", 1))
    try:
        await client.initialize()
        slot_map = SlotMap(client)
        await slot_map.refresh()
        masters = slot_map.masters()
        live = {node.port for node in redis_cluster.live_nodes()}
        assert len(masters) == 3 and {m.port for m in masters.values()} <= live
        for key in [protocol.live_channel(protocol.new_generation_id()) for _ in range(20)]:
            assert slot_map.master_of(key) == f"127.0.0.1:{redis_cluster.node_of(key).port}"
        for master in masters.values():
            own = aioredis.Redis.from_pool(slot_map.own_connection_pool(master, 2))
            try:
                assert (await own.info("server"))["tcp_port"] == master.port
            finally:
                await own.aclose()
    finally:
        await client.aclose()


async def test_a_redis_py_without_the_internal_is_said_once_and_not_fatal(
    caplog: pytest.LogCaptureFixture,
):
    changed = SlotMap(types.SimpleNamespace())  # type: ignore[arg-type]  # no nodes_manager
    with caplog.at_level(logging.WARNING, logger="broker.core.cluster"):
        await changed.refresh()
        await changed.refresh()
    assert [r.getMessage() for r in caplog.records].count(
        caplog.records[0].getMessage()) == 1 and "MOVED" in caplog.records[0].getMessage()
