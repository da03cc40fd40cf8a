"""``collect_less``: what the edge's ``serve`` does to the cyclic garbage collector before
serving (a higher threshold for the youngest generation, the startup heap frozen out of later
collections). The process's collector is put back as it was after each test."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from broker.edge.uvicorn_extensions import GC_YOUNG_THRESHOLD, collect_less


@pytest.fixture
def collector_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector_restored")
def test_the_young_threshold_rises_and_the_older_ones_stay() -> None:
    gc.set_threshold(700, 11, 12)
    collect_less()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 11, 12)
    assert GC_YOUNG_THRESHOLD > 700


@pytest.mark.usefixtures("collector_restored")
def test_what_exists_before_serving_is_frozen_out_of_later_collections() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the cyclic collector could free it

    before = Node()
    before_ref = weakref.ref(before)
    collect_less()
    assert gc.get_freeze_count() > 0
    after = Node()
    after_ref = weakref.ref(after)
    del before, after
    gc.collect()
    assert before_ref() is not None  # frozen: never traversed, so never freed
    assert after_ref() is None  # garbage made while serving is collected as ever
