"""``broker cluster`` picks its children's ports below the kernel's ephemeral range, where no
outgoing connection (its own edges connecting to Redis while the next edge starts) can take
one between the pick and the child's bind."""

from __future__ import annotations

import socket

import pytest

from broker.tools import localcluster


def ephemeral_range() -> tuple[int, int]:
    low, high = localcluster.EPHEMERAL_PORTS.read_text().split()
    return int(low), int(high)


@pytest.mark.skipif(not localcluster.EPHEMERAL_PORTS.exists(), reason="Linux's /proc only")
def test_ports_are_free_and_outside_the_ephemeral_range() -> None:
    low, _ = ephemeral_range()
    assert low - localcluster.LOWEST_CHOSEN_PORT >= 1000  # (Debian's default: 32768)
    ports = [localcluster.free_port() for _ in range(50)]
    for port in ports:
        assert localcluster.LOWEST_CHOSEN_PORT <= port < low, port
        with socket.socket() as s:
            s.bind((localcluster.LOOPBACK, port))  # free, as promised

