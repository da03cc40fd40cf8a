"""REDIS_URL with several cluster seeds: what redis-py is given."""

from __future__ import annotations

import pytest

from broker.core.store import cluster_seeds


def test_one_seed_is_the_url_redis_py_parses():
    assert cluster_seeds("redis+cluster://10.0.0.1:7000") == ("redis://10.0.0.1:7000", [])


def test_more_seeds_keep_credentials_database_and_options_on_the_first():
    url = "rediss+cluster://user:p%40ss@a.example:7000,b.example:7001,[::1]:7002/0?ssl_cert_reqs=none"
    first, others = cluster_seeds(url)
    assert first == "rediss://user:p%40ss@a.example:7000/0?ssl_cert_reqs=none"
    assert others == [("b.example", 7001), ("::1", 7002)]


@pytest.mark.parametrize("url", ["redis+cluster://", "redis+cluster://a:1,b", "redis+cluster://a:1,:7"])
def test_a_seed_without_a_port_is_refused(url: str):
    with pytest.raises(ValueError):
        cluster_seeds(url)
