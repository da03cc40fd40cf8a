"""The benchmark's load generator: N SSE viewers, as cheap as Python allows.

Each viewer is an ``asyncio.Protocol`` on a raw socket (no HTTP client library): it sends a
``GET /v1/generations/{id}/events``, decodes the chunked body and the SSE frames itself, and
checks exactly-once, in-order delivery: ids 1..N as message events, then ``event: end`` with
id N+1, nothing else. Any other id (a loss, a duplicate, a reordering), a missing terminal or
an early close is an error. Each message's text starts with ``t=<publish ns> s=<seq> ``, so
each delivery yields a publish→receive latency (receive time: when its bytes were read).

Viewers may watch several generations (``--gen-ids-file``: viewer i watches generation
i // viewers-per-generation) on several edges (``--port 8001,8002``: viewer i connects to
port i mod n, so each generation's viewers are spread over the edges), and may resume
(``--last-event-id K``: sent as ``Last-Event-ID``; the stream must then start at K+1). With
``--caught-up-at H`` each viewer records when it received event H (the log's head when it
connected: from then on it is live) and only events after H count for latency (the ones
before were published long ago).

Protocol with the orchestrator (lines on stdout): ``ready`` once every viewer has its response
headers (the edge answers after its subscription is in place), ``done`` once every viewer has
finished (results written to ``--out``), then it waits for stdin to close so its CPU can be
read while it is still alive. An error prints ``error <message>`` and exits 1.

``--seq-from-text`` (the Nchan peer, whose SSE ids are its own ``<time>:<tag>``): the same
exactly-once, in-order check on the ``s=<seq>`` in each text, then ``event: end``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import sys
import time
from array import array

try:
    import uvloop
except ImportError:  # pragma: no cover - uvicorn[standard] brings it
    uvloop = None  # type: ignore[assignment]

MAX_ERRORS_KEPT = 20


class Run:
    """What all viewers of this process share: expectations, latencies, errors."""

    def __init__(self, messages: int, caught_up_at: int = 0, seq_from_text: bool = False) -> None:
        self.messages = messages
        self.seq_from_text = seq_from_text
        self.caught_up_at = caught_up_at
        self.caught_up = 0  # viewers that have received event ``caught_up_at``
        self.last_caught_up_ns = 0
        self.caught_up_ns: list[int] = []  # when each viewer received ``caught_up_at``
        self.all_caught_up = asyncio.Event()
        self.latencies_ms = array("d")
        self.errors: list[str] = []
        self.error_count = 0
        self.finished = 0
        self.first_ns = 0
        self.last_ns = 0
        self.all_done = asyncio.Event()
        self.viewers = 0
        self.connect_start_ns = 0

    def fail(self, viewer: int, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"viewer {viewer}: {message}")

    def viewer_over(self) -> None:
        self.finished += 1
        if self.finished == self.viewers:
            self.all_done.set()


class Viewer(asyncio.Protocol):
    def __init__(self, run: Run, index: int, request: bytes, first_seq: int = 1) -> None:
        self.run = run
        self.index = index
        self.request = request
        self.headers: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.raw = bytearray()  # bytes not yet decoded (head, then chunked body)
        self.sse = bytearray()  # decoded body not yet split into events
        self.in_body = False
        self.chunked = True
        self.chunk_left = 0  # bytes left in the current chunk, its CRLF included
        self.next_seq = first_seq
        self.over = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if self.over:
            return
        self.raw += data
        if not self.in_body and not self._read_head():
            return
        if self.chunked:
            self._dechunk()
        else:
            self.sse += self.raw
            self.raw.clear()
        self._read_events(now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.over:
            self._end(f"connection closed before the terminal event (next id {self.next_seq})")

    # -- parsing ---------------------------------------------------------------------------

    def _read_head(self) -> bool:
        end = self.raw.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.raw[:end]).decode("latin-1")
        del self.raw[: end + 4]
        status_line, _, fields = head.partition("\r\n")
        if status_line.split(" ", 2)[1:2] != ["200"]:
            self._end(f"answered {status_line!r}")
            return False
        self.chunked = "transfer-encoding: chunked" in fields.lower()
        self.in_body = True
        if not self.headers.done():
            self.headers.set_result(None)
        return True

    def _dechunk(self) -> None:
        raw, pos = self.raw, 0
        while pos < len(raw):
            if self.chunk_left == 0:
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(bytes(raw[pos:eol]).split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:  # the response ended
                    break
                self.chunk_left = size + 2
            take = min(self.chunk_left, len(raw) - pos)
            data = min(take, max(0, self.chunk_left - 2))  # leave the chunk's CRLF out
            if data:
                self.sse += raw[pos : pos + data]
            pos += take
            self.chunk_left -= take
        del raw[:pos]

    def _read_events(self, now: int) -> None:
        sse = self.sse
        start = 0
        fast = not self.run.seq_from_text
        while not self.over:
            end = sse.find(b"\n\n", start)
            if end < 0:
                break
            # The broker's message frame, ``id: <10 digits>\ndata: <json>``, parsed in place:
            # B4 replays a million of them, and the load generator shares the 2 cores.
            if fast and sse.startswith(b"id: ", start) and sse.startswith(b"\ndata: ", start + 14):
                self._message(int(sse[start + 4 : start + 14]), bytes(sse[start + 21 : end]), now)
            else:
                self._event(bytes(sse[start:end]), now)
            start = end + 2
        del sse[:start]

    def _event(self, block: bytes, now: int) -> None:
        if self.run.seq_from_text:
            self._event_by_text(block, now)
            return
        seq = -1
        kind = b""
        data = b""
        for line in block.split(b"\n"):
            if line.startswith(b"id: "):
                seq = int(line[4:])
            elif line.startswith(b"data: "):
                data = line[6:]
            elif line.startswith(b"event: "):
                kind = line[7:]
        if seq < 0 and not data:
            return  # retry: or a comment (keepalive)
        expected = self.next_seq
        if kind == b"":
            self._message(seq, data, now)
        elif kind == b"end" and seq == expected == self.run.messages + 1:
            self._end(None)
        else:
            self._end(f"got event {kind!r} id {seq}, expected id {expected}: {data[:80]!r}")

    def _message(self, seq: int, data: bytes, now: int) -> None:
        """A message event (no ``event:`` field): the next id, carrying its own ``s=<seq>``."""
        expected = self.next_seq
        if seq != expected or seq > self.run.messages:
            what = "duplicate or out of order" if 0 < seq < expected else "lost events"
            self._end(f"got id {seq}, expected {expected} ({what})")
            return
        if not data.startswith(b'{"text":"t=') or b" s=%d " % seq not in data:
            self._end(f"event {seq} carries someone else's data: {data[:60]!r}")
            return
        run = self.run
        if seq > run.caught_up_at:
            published = int(data[11 : data.index(b" ", 11)])
            run.latencies_ms.append((now - published) / 1e6)
            if run.first_ns == 0:
                run.first_ns = now
            run.last_ns = max(run.last_ns, now)
        elif seq == run.caught_up_at:
            run.caught_up += 1
            run.last_caught_up_ns = max(run.last_caught_up_ns, now)
            run.caught_up_ns.append(now)
            if run.caught_up == run.viewers:
                run.all_caught_up.set()
        self.next_seq = seq + 1

    def _event_by_text(self, block: bytes, now: int) -> None:
        """``--seq-from-text``: ids are the server's own (Nchan's ``<time>:<tag>``), so order
        and exactly-once are checked on the ``s=<seq>`` each text carries: seq 1..N as message
        events, then ``event: end``, nothing else."""
        kind = b""
        data = b""
        has_id = False
        for line in block.split(b"\n"):
            if line.startswith(b"id: "):
                has_id = True
            elif line.startswith(b"data: "):
                data = line[6:]
            elif line.startswith(b"event: "):
                kind = line[7:]
        if not data and not kind:
            return  # a comment (Nchan's ": hi", keepalives) or retry:
        expected = self.next_seq
        if kind == b"" and data.startswith(b'{"text":"t='):
            head = data[11 : data.find(b" ", data.find(b" s=") + 3)]  # b"<ns> s=<seq>"
            published, _, seq_text = head.partition(b" s=")
            seq = int(seq_text) if seq_text.isdigit() else -1
            if seq != expected or seq > self.run.messages or not has_id:
                what = "duplicate or out of order" if 0 < seq < expected else "lost events"
                self._end(f"got s={seq}, expected {expected} ({what}; id line: {has_id})")
                return
            self.run.latencies_ms.append((now - int(published)) / 1e6)
            if self.run.first_ns == 0:
                self.run.first_ns = now
            self.run.last_ns = max(self.run.last_ns, now)
            self.next_seq = seq + 1
        elif kind == b"end" and expected == self.run.messages + 1:
            self._end(None)
        else:
            self._end(f"got event {kind!r}, expected s={expected}: {data[:80]!r}")

    def _end(self, error: str | None) -> None:
        self.over = True
        if error is not None:
            self.run.fail(self.index, error)
            if not self.headers.done():
                self.headers.set_exception(RuntimeError(error))
        if self.transport is not None:
            self.transport.close()
        self.run.viewer_over()


def viewer_plan(args: argparse.Namespace) -> list[tuple[int, str, int]]:
    """(global viewer index, generation id, port) of each viewer of this process."""
    if args.gen_ids_file:
        with open(args.gen_ids_file, encoding="ascii") as f:
            gen_ids = f.read().split()
    else:
        gen_ids = [args.gen_id]
    ports = [int(p) for p in str(args.port).split(",")]
    plan = []
    for index in range(args.first_index, args.first_index + args.viewers):
        generation = index // args.viewers_per_gen
        if generation >= len(gen_ids):
            raise SystemExit(f"viewer {index} has no generation ({len(gen_ids)} given)")
        plan.append((index, gen_ids[generation], ports[index % len(ports)]))
    return plan


async def open_viewers(args: argparse.Namespace, run: Run) -> list[Viewer]:
    loop = asyncio.get_running_loop()
    resume = f"Last-Event-ID: {args.last_event_id}\r\n" if args.last_event_id else ""
    requests: dict[tuple[str, int], bytes] = {}
    gate = asyncio.Semaphore(args.connects_in_flight)
    viewers: list[Viewer] = []

    async def connect(index: int, gen_id: str, port: int) -> None:
        request = requests.get((gen_id, port))
        if request is None:
            request = requests[gen_id, port] = (
                f"GET /v1/generations/{gen_id}/events HTTP/1.1\r\n"
                f"Host: {args.host}:{port}\r\n{resume}"
                "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
            ).encode()
        async with gate:
            viewer = Viewer(run, index, request, first_seq=args.last_event_id + 1)
            viewers.append(viewer)
            await loop.create_connection(lambda: viewer, args.host, port)
            await viewer.headers

    plan = viewer_plan(args)
    run.viewers = len(plan)
    run.connect_start_ns = time.time_ns()
    async with asyncio.timeout(args.connect_timeout):
        await asyncio.gather(*(connect(*viewer) for viewer in plan))
    return viewers


def churn_plan(args: argparse.Namespace) -> list[tuple[float, int, str, int]]:
    """``--churn`` (B7): (connect offset s, global viewer index, generation id, port) of this
    process's viewers; viewer i of the shape's plan (``bench.churn.Shape.viewer_plan``) is
    this process's when i mod ``--loadgens`` is ``--loadgen-index``."""
    from bench.churn import Shape

    shape = Shape.from_args(args)
    with open(args.gen_ids_file, encoding="ascii") as f:
        gen_ids = f.read().split()
    ports = [int(p) for p in str(args.port).split(",")]
    return [(at, i, gen_ids[k], ports[i % len(ports)])
            for i, (at, k) in enumerate(shape.viewer_plan())
            if i % args.loadgens == args.loadgen_index]


async def run_churn(args: argparse.Namespace) -> Run:
    """``--churn``: each viewer connects at its answer's time (from ``--start-at-ns``),
    watches it to ``end`` and leaves; ``ready`` at once, ``done`` when every viewer is over."""
    run = Run(args.messages, 0, args.seq_from_text)
    plan = churn_plan(args)
    run.viewers = len(plan)
    loop = asyncio.get_running_loop()
    viewers: list[Viewer] = []
    print("ready", flush=True)
    start = time.monotonic() + (args.start_at_ns - time.time_ns()) / 1e9
    run.connect_start_ns = args.start_at_ns

    async def connect(viewer: Viewer, port: int) -> None:
        try:
            async with asyncio.timeout(args.connect_timeout):
                await loop.create_connection(lambda: viewer, args.host, port)
                await viewer.headers
        except Exception as e:  # any failure to connect is this viewer's error
            if not viewer.over:
                viewer._end(f"connect failed: {type(e).__name__}: {e}")

    tasks = []
    try:
        for at, index, gen_id, port in plan:
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            request = (
                f"GET /v1/generations/{gen_id}/events HTTP/1.1\r\n"
                f"Host: {args.host}:{port}\r\n"
                "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
            ).encode()
            viewer = Viewer(run, index, request)
            viewers.append(viewer)
            tasks.append(asyncio.create_task(connect(viewer, port)))
        try:
            async with asyncio.timeout(args.run_timeout):
                await run.all_done.wait()
        except TimeoutError:
            stuck = [v for v in viewers if not v.over]
            for v in stuck[:MAX_ERRORS_KEPT]:
                run.fail(v.index, f"timed out after id {v.next_seq - 1}")
            run.error_count += max(0, len(stuck) - MAX_ERRORS_KEPT)
    finally:
        for t in tasks:
            t.cancel()
        for v in viewers:
            if v.transport is not None:
                v.transport.close()
    return run


async def run_viewers(args: argparse.Namespace) -> Run:
    """Open every viewer, say ``ready``, then wait (bounded) until each has finished."""
    if args.churn:
        return await run_churn(args)
    run = Run(args.messages, args.caught_up_at, args.seq_from_text)
    viewers: list[Viewer] = []
    if args.start_at_ns:  # several load generators start their storm at the same instant
        await asyncio.sleep(max(0.0, (args.start_at_ns - time.time_ns()) / 1e9))
    try:
        viewers = await open_viewers(args, run)
        print("ready", flush=True)
        if args.caught_up_at:
            async with asyncio.timeout(args.run_timeout):
                await run.all_caught_up.wait()
            print("caught_up", flush=True)
        try:
            async with asyncio.timeout(args.run_timeout):
                await run.all_done.wait()
        except TimeoutError:
            stuck = [v for v in viewers if not v.over]
            for v in stuck[:MAX_ERRORS_KEPT]:
                run.fail(v.index, f"timed out after id {v.next_seq - 1}")
            run.error_count += max(0, len(stuck) - MAX_ERRORS_KEPT)
    finally:
        for v in viewers:
            if v.transport is not None:
                v.transport.close()
    return run


def write_results(args: argparse.Namespace, run: Run) -> None:
    with open(args.out + ".lat", "wb") as f:
        run.latencies_ms.tofile(f)
    summary = {
        "viewers": run.viewers,
        "finished_ok": run.viewers - run.error_count,
        "error_count": run.error_count,
        "errors": run.errors,
        "deliveries": len(run.latencies_ms),
        "first_recv_ns": run.first_ns,
        "last_recv_ns": run.last_ns,
        "connect_start_ns": run.connect_start_ns,
        "caught_up": run.caught_up,
        "last_caught_up_ns": run.last_caught_up_ns,
        "caught_up_ns": run.caught_up_ns,
        "latencies_file": args.out + ".lat",
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(summary, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", required=True,
                        help="the edge's port, or several comma-separated: viewer i uses "
                             "port i mod n")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gen-id", help="the one generation every viewer watches")
    source.add_argument("--gen-ids-file",
                        help="whitespace-separated generation ids: viewer i watches "
                             "id number i // --viewers-per-gen")
    parser.add_argument("--viewers-per-gen", type=int, default=1 << 30)
    parser.add_argument("--viewers", type=int, default=0,
                        help="viewers of this process (all but --churn)")
    parser.add_argument("--first-index", type=int, default=0, help="number of the first viewer")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--last-event-id", type=int, default=0,
                        help="resume: send this Last-Event-ID, expect the stream from the next")
    parser.add_argument("--caught-up-at", type=int, default=0,
                        help="say 'caught_up' once every viewer has received this event; "
                             "latency counts only events after it")
    parser.add_argument("--start-at-ns", type=int, default=0,
                        help="start connecting at this time.time_ns() (0: at once)")
    parser.add_argument("--connects-in-flight", type=int, default=64,
                        help="connections opened at once (B4's storm: all of them)")
    parser.add_argument("--out", required=True, help="results file (JSON; latencies in .lat)")
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--run-timeout", type=float, default=120.0,
                        help="seconds after 'ready' for every viewer to finish")
    parser.add_argument("--seq-from-text", action="store_true",
                        help="check order on the s=<seq> in each text, not on the SSE id "
                             "(servers with ids of their own: the Nchan peer)")
    parser.add_argument("--churn", action="store_true",
                        help="B7: viewers connect, watch one answer and leave, on the schedule "
                             "of bench.churn.Shape (its options, --gen-ids-file, --start-at-ns)")
    parser.add_argument("--loadgens", type=int, default=1, help="--churn: load generators")
    parser.add_argument("--loadgen-index", type=int, default=0,
                        help="--churn: this one's number; it takes viewers i with "
                             "i mod --loadgens equal to it")
    parser.add_argument("--generations", type=int, default=0, help="--churn: see bench.churn")
    parser.add_argument("--rounds", type=int, default=2, help="--churn: see bench.churn")
    parser.add_argument("--rate", type=float, default=5.0, help="--churn: see bench.churn")
    parser.add_argument("--lead", type=float, default=0.3, help="--churn: see bench.churn")
    parser.add_argument("--max-viewers", type=int, default=2, help="--churn: see bench.churn")
    args = parser.parse_args()
    if args.churn and not (args.gen_ids_file and args.generations and args.start_at_ns):
        parser.error("--churn needs --gen-ids-file, --generations and --start-at-ns")
    if not args.churn and args.viewers < 1:
        parser.error("--viewers is required")
    runner = uvloop.run if uvloop is not None else asyncio.run
    try:
        run = runner(run_viewers(args))
    except Exception as e:
        print(f"error {type(e).__name__}: {e}".replace("\n", " "), flush=True)
        raise SystemExit(1) from e
    write_results(args, run)
    print("done", flush=True)
    # Stay alive until the orchestrator has read our CPU time (it closes our stdin).
    select.select([sys.stdin], [], [], 60)


if __name__ == "__main__":
    main()
