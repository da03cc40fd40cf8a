"""The Nchan peer's pieces that need no nginx: its config, its status page, and the load
generator's ``--seq-from-text`` check (Nchan's SSE ids are its own, so order is read from
the ``s=<seq>`` in each text)."""

from __future__ import annotations

import time
from pathlib import Path

from bench.loadgen import Run, Viewer
from bench.nchan import redis_channel, render_config, stub_status_field

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\r\n: hi\n\n"


def message(seq: int, tag: int | None = None) -> bytes:
    text = f"t={time.time_ns()} s={seq} The quick brown fox."
    return b'id: 1795524004:%d\ndata: {"text":"%s"}\n\n' % (tag or seq, text.encode())


END = b'event: end\nid: 1795524004:99\ndata: {"finish_reason":"stop","usage":null}\n\n'


def viewer(messages: int) -> tuple[Run, Viewer]:
    run = Run(messages, seq_from_text=True)
    run.viewers = 1
    return run, Viewer(run, 0, b"")


async def test_seq_from_text_accepts_an_nchan_stream() -> None:
    run, v = viewer(3)
    v.data_received(HEAD + message(1))
    v.data_received(message(2) + message(3) + END)
    assert run.error_count == 0
    assert v.over and run.finished == 1 and len(run.latencies_ms) == 3


async def test_seq_from_text_fails_a_duplicate_a_loss_and_an_early_end() -> None:
    for body, word in ((message(1) + message(1, tag=7), "duplicate"),
                       (message(1) + message(3), "lost"),
                       (message(1) + END, "expected s=2")):
        run, v = viewer(3)
        v.data_received(HEAD + body)
        assert run.error_count == 1 and word in run.errors[0], run.errors


def test_config_has_one_worker_redis_storage_and_no_replay() -> None:
    conf = render_config(module=Path("/m/ngx_nchan_module.so"), prefix=Path("/tmp/p"),
                         port=8123, redis_url="redis://127.0.0.1:7000/0")
    for line in ("load_module /m/ngx_nchan_module.so;", "worker_processes 1;",
                 "nchan_redis_server redis://127.0.0.1:7000/0;", "listen 127.0.0.1:8123;",
                 "nchan_subscriber eventsource;", "nchan_subscriber_first_message newest;",
                 "nchan_stub_status;", "nchan_publisher http;"):
        assert line in conf, line
    assert conf.count("nchan_redis_pass bench_redis;") == 2  # publisher and subscriber


def test_stub_status_and_channel_names() -> None:
    status = "total published messages: 3\nchannels: 1\nsubscribers: 42\nnchan version: 1.3.6\n"
    assert stub_status_field(status, "subscribers") == 42
    assert stub_status_field(status, "redis connected servers") == -1
    assert redis_channel("abc") == "{channel:/abc}:pubsub"
