"""What the edge needs to know of a Redis Cluster's slot map, in one place: which masters
serve slots, which master serves a key, how to open a connection of one's own to a master, and
how to re-read the map after a failover or a slot move.

Everything goes through redis-py's public ``RedisCluster`` methods (``get_primaries``,
``get_node_from_key``, ``get_connection_kwargs``) but one: re-reading the slot map on demand,
which redis-py only does from ``nodes_manager.initialize()`` (it re-reads by itself only at
startup, and slot by slot as MOVED replies come). That one is guarded: if redis-py changes
under it, the edge says so once and follows the map the MOVED replies keep up to date.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import RedisClusterException

log = logging.getLogger(__name__)

# What a connection of one's own to a master takes from the cluster client's settings.
_OWN_CONNECTION_OPTIONS = {
    "username", "password", "credential_provider", "client_name", "socket_timeout",
    "socket_connect_timeout", "socket_keepalive", "socket_keepalive_options",
    "health_check_interval",
}


@dataclass(frozen=True, slots=True)
class Master:
    name: str  # host:port, as redis-py names its nodes
    host: str
    port: int


class SlotMap:
    """A cluster client's view of who serves which slot (``client``: the edge's own)."""

    def __init__(self, client: aioredis.RedisCluster) -> None:
        self.client = client
        self._warned = False

    async def refresh(self) -> None:
        """Re-read the slot map from the cluster (after a failover or a slot move)."""
        try:
            initialize = self.client.nodes_manager.initialize
        except AttributeError:
            self._internals_changed()
            return
        await initialize()

    def masters(self) -> dict[str, Master]:
        """The masters serving slots, by name."""
        return {node.name: Master(node.name, node.host, int(node.port))
                for node in self.client.get_primaries()}

    def master_of(self, key: str) -> str | None:
        """The name of the master serving ``key``'s slot; None while no master serves it
        (mid-failover)."""
        try:
            node = self.client.get_node_from_key(key)
        except RedisClusterException:  # the slot is not covered
            return None
        return None if node is None else node.name

    def own_connection_pool(self, master: Master, max_connections: int) -> aioredis.ConnectionPool:
        """A pool of connections to ``master`` with the cluster client's own settings (TLS,
        credentials, timeouts, name), for what the cluster client does not do well itself
        (the edge's sharded subscriptions)."""
        kwargs = self.client.get_connection_kwargs()
        options: dict[str, Any] = {
            k: v for k, v in kwargs.items()
            if k in _OWN_CONNECTION_OPTIONS or (k.startswith("ssl_") and v is not None)
        }
        return aioredis.ConnectionPool(
            connection_class=kwargs.get("connection_class") or Connection, host=master.host,
            port=master.port, max_connections=max_connections, **options,
        )

    def _internals_changed(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning("redis-py %s: RedisCluster.nodes_manager.initialize() is gone; the "
                        "edge follows slot moves by MOVED replies only", redis.__version__)
