"""A real Redis Cluster for tests: redis-server nodes on free ports, joined by redis-cli."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import redis

from tests.support.procs import RedisServer, free_port, wait_until


class RedisClusterServers:
    """``masters`` primaries (the slots split evenly), each with ``replicas`` replicas."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        self.masters = masters
        self.replicas = replicas
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """The form REDIS_URL takes for a cluster: any node seeds the topology."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> RedisClusterServers:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed (.ci/run installs redis-server)")
        # A short node timeout so a killed master fails over in about a second.
        args = ("--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
                "--cluster-config-file", "nodes.conf")
        for _ in range(self.masters * (1 + self.replicas)):
            # The bus port is explicit: the default (port + 10000) may not exist or be taken.
            self.nodes.append(RedisServer(*args, "--cluster-port", str(free_port())).start())
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas),
             "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
        )
        wait_until(self.healthy, 30, "the cluster to converge")
        # A replica that never finished its first sync refuses to take over a failed master.
        wait_until(self.replicas_in_sync, 30, "the replicas' first sync")
        return self

    def replicas_in_sync(self) -> bool:
        return all(
            node.client().info("replication").get("master_link_status") == "up"
            for node in self.live_nodes() if self.role(node) != "master"
        )

    def healthy(self) -> bool:
        """Every live node sees all slots served and agrees on the number of masters."""
        for node in self.live_nodes():
            info = node.client().execute_command("CLUSTER", "INFO").decode()
            fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
            if fields.get("cluster_state") != "ok" or fields.get("cluster_size") != str(
                self.masters
            ):
                return False
        return True

    def live_nodes(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.live_nodes()[0].port)

    def node_of(self, key: str) -> RedisServer:
        """The live node that is master of ``key``'s slot, as the cluster itself reports."""
        slot = self.client().keyslot(key)
        for start, end, master, *_replicas in self.live_nodes()[0].client().execute_command(
            "CLUSTER", "SLOTS"
        ):
            if start <= slot <= end:
                return next(n for n in self.live_nodes() if n.port == int(master[1]))
        raise LookupError(f"no live master serves {key!r}")

    def move_slot_of(self, key: str, target: RedisServer) -> None:
        """Migrate ``key``'s slot, keys and all, to ``target`` (what resharding does)."""
        slot = self.client().keyslot(key)
        source = self.node_of(key)
        src, dst = source.client(), target.client()
        src_id = src.execute_command("CLUSTER", "MYID").decode()
        dst_id = dst.execute_command("CLUSTER", "MYID").decode()
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        # Masters only: a replica refuses SETSLOT (it follows its master).
        masters = [n.client() for n in self.live_nodes() if self.role(n) == "master"]
        for node in [dst, src, *masters]:
            node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)

    def replica_of(self, master: RedisServer) -> RedisServer:
        """A live replica of ``master``."""
        for node in self.live_nodes():
            if self.role(node) != "master" and int(
                    node.client().info("replication")["master_port"]) == master.port:
                return node
        raise LookupError(f"no live replica of the master on {master.port}")

    def role(self, node: RedisServer) -> str:
        return str(node.client().execute_command("ROLE")[0].decode())

    def everywhere(self, *command: Any) -> list[Any]:
        """Run ``command`` on every live node (e.g. PUBSUB SHARDNUMSUB, CLIENT LIST)."""
        return [node.client().execute_command(*command) for node in self.live_nodes()]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
