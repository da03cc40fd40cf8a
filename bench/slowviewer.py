"""B8's slow viewer: one viewer that reads far slower than the stream until the edge closes it.

It follows the generation with the product's own client (``broker.client.Follower``, which
resumes with ``Last-Event-ID`` like EventSource) over a socket whose receive buffer is fixed
(``SO_RCVBUF``, no autotuning), so its lag backs up into the edge's socket instead of this
process's memory. It sleeps ``--delay`` after each message until the orchestrator says the
edge closed it (for a write blocked longer than ``BROKER_SEND_TIMEOUT``: the edge's metric),
then reads at full speed: what the closed response still had in the sockets' buffers, then
the rest after resuming. It checks exactly-once, in-order delivery (each text carries
``s=<seq>``, the publisher's) and ``end``.

Protocol with the orchestrator (lines): ``closed`` on stdin ends the slow reading; prints
``done`` once the stream ended, results in ``--out`` (JSON: messages, reconnects, the ns time
of the first message after the first reconnect, errors); then waits for stdin to close so its
CPU can be read while it is alive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import httpx

from broker.client import Follower, StreamError

MAX_ERRORS_KEPT = 20


async def run(args: argparse.Namespace) -> None:
    closed, stdin_closed = asyncio.Event(), asyncio.Event()
    listener = asyncio.create_task(listen(closed, stdin_closed))
    result = await follow(args, closed)
    await asyncio.to_thread(Path(args.out).write_text, json.dumps(result), encoding="utf-8")
    print("done", flush=True)
    await stdin_closed.wait()  # the orchestrator reads our CPU first
    await listener


async def listen(closed: asyncio.Event, stdin_closed: asyncio.Event) -> None:
    """Lines from the orchestrator: ``closed`` sets ``closed``; the end of stdin, the other."""
    while line := await asyncio.to_thread(sys.stdin.readline):
        if line.strip() == "closed":
            closed.set()
    stdin_closed.set()


async def follow(args: argparse.Namespace, closed: asyncio.Event) -> dict[str, object]:
    transport = httpx.AsyncHTTPTransport(
        socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)]
    )
    errors: list[str] = []
    messages = 0
    reconnected_ns = 0
    async with httpx.AsyncClient(timeout=args.timeout, transport=transport) as http:
        follower = Follower(http, args.url, give_up_after=args.timeout)
        try:
            async for message in follower:
                messages += 1
                seq = int(message.text.split(" ", 2)[1].removeprefix("s="))
                if seq != messages and len(errors) < MAX_ERRORS_KEPT:
                    errors.append(f"message {messages} carries s={seq} (id {message.id})")
                if follower.reconnects:
                    reconnected_ns = reconnected_ns or time.time_ns()
                if not closed.is_set():
                    await asyncio.sleep(args.delay)
        except StreamError as e:
            errors.append(f"{type(e).__name__}: {e}")
    if messages != args.messages:
        errors.append(f"{messages} messages, expected {args.messages}")
    if follower.result is None or follower.result.finish_reason != "stop":
        errors.append(f"ended with {follower.result}, expected end/stop")
    return {"messages": messages, "reconnects": follower.reconnects,
            "first_message_after_reconnect_ns": reconnected_ns, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the generation's events URL")
    parser.add_argument("--messages", type=int, required=True, help="messages expected")
    parser.add_argument("--delay", type=float, default=0.2,
                        help="seconds slept after each message until the first reconnect")
    parser.add_argument("--rcvbuf", type=int, default=65536, help="SO_RCVBUF, bytes")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="HTTP timeout, and how long without progress before giving up")
    parser.add_argument("--out", required=True, help="results file (JSON)")
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
