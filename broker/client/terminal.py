"""The terminal clients ``broker ask`` and ``broker tail``, built on ``broker.client``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import ssl
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TextIO
from urllib.parse import quote

import httpx

from broker.client import (
    ConversationFollower,
    Event,
    Follower,
    GenerationFailed,
    GenerationNotFound,
    RequestRejected,
    StreamError,
    create,
)
from broker.core import protocol

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_OK = 0  # the generation ended with `event: end` (any finish_reason, cancelled too)
EXIT_FAILED = 1  # it ended with `event: error`
EXIT_REJECTED = 2  # a usage error, or the edge refused the request (4xx)
EXIT_UNAVAILABLE = 3  # not found (404/410), or the edge unreachable / failing past the deadline
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_BROKEN_PIPE = 141  # stdout closed by the reader (`broker ask ... | head`)
AUTH_HINT = (" (pass --api-key or set BROKER_API_KEY, or the viewer token with --token or "
             "BROKER_VIEWER_TOKEN)")
UNTRUSTED_HINT = (" (the edge's certificate is not trusted here: set SSL_CERT_FILE to it, or "
                  "to its CA's, in PEM; `broker cluster --tls` prints its cert.pem)")

CLIENT_EPILOG = """\
exit status:
  0    the generation ended (event: end; any finish_reason, cancelled included)
  1    the generation failed (event: error; `error: <code>: <message>` on stderr)
  2    usage error, or the edge rejected the request (4xx)
  3    generation not found (404/410), or the edge unreachable or failing too long
  130  interrupted (Ctrl-C); the generation goes on, `broker tail ID` follows it
"""


class _Output:
    """A text stream that remembers whether its line is open (the last write did not end
    with a newline), so that side lines start on a line of their own."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.line_open = False

    def write(self, text: str) -> None:
        if text:
            self.stream.write(text)
            self.stream.flush()
            self.line_open = not text.endswith("\n")

    def end_line(self) -> None:
        if self.line_open:
            self.write("\n")


# SGR faint on, then normal intensity (not a full reset: the terminal's own colours stay).
DIM, UNDIM = "\x1b[2m", "\x1b[22m"
# What must not reach a one-line rendering as itself: every control character (C0, DEL, C1:
# line ends, and escape sequences a terminal would act on) but the tab, and the two Unicode
# line separators. Each is shown as its escape instead.
_ESCAPES = {ord("\n"): "\\n", ord("\r"): "\\r"}
_LINE_UNSAFE = {c: _ESCAPES.get(c, f"\\u{c:04x}")
                for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029] if c != ord("\t")}


def one_line(text: str) -> str:
    """``text`` on one line: line ends, other control characters and U+2028/U+2029 escaped
    (``\\n``, ``\\r``, ``\\u2028``, ...); everything else as it is."""
    return text.translate(_LINE_UNSAFE)


def side_line(event: Event) -> str:
    """How plain mode shows an event that is neither answer nor reasoning: one line,
    ``[<kind> <key>] <value>`` (the key: a tool call's id, a data event's name)."""
    data = event.data
    if event.kind == "tool_call":
        head, body = f"tool_call {data.get('id')}", f"{data.get('name')}({data.get('arguments')})"
    elif event.kind == "tool_result":
        head, body = f"tool_result {data.get('id')}", _json(data.get("result"))
    elif event.kind == "data":
        head, body = f"data {data.get('name')}", _json(data.get("value"))
    else:  # a kind newer than this client
        head, body = event.kind, _json(data)
    return one_line(f"[{head}] {body}")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return callable(isatty) and bool(isatty())


def _colors_on(stream: TextIO) -> bool:
    """Dimmed text only on a terminal that shows it (https://no-color.org: NO_COLOR off)."""
    return (_is_terminal(stream) and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb")


class Printer:
    """Writes a followed generation (or a conversation's turns, each opened by a
    ``── turn N (<generation id>) ──`` line on stdout) as it arrives.

    Plain: stdout gets the answer's text and nothing else when it is a file or a pipe; the
    reasoning (a block per run of reasoning events, ``[reasoning] `` first) and one line per
    tool call, tool result and data event (``side_line``) go to stderr. When stdout is a
    terminal they all share it, in the stream's order, the reasoning dimmed.

    ``--json``: one JSON object per event line, each with ``id`` (the event id) and ``event``
    (its kind): ``text`` for a message; the event's own ``data`` for reasoning, tool calls,
    tool results and data; then ``finish_reason`` and ``usage`` (``end``) or ``error``
    (``{"code", "message"}``). A conversation's lines also hold ``generation_id`` (after
    ``event``), and each turn opens with ``{"id", "event": "turn", "generation_id", "turn",
    "status"}``."""

    def __init__(self, as_json: bool, stdout: TextIO | None = None,
                 stderr: TextIO | None = None) -> None:
        self.as_json = as_json
        self.out = _Output(stdout or sys.stdout)
        # The answer alone on stdout where a program reads it; one screen for a person.
        terminal = _is_terminal(self.out.stream)
        self.side = self.out if terminal else _Output(stderr or sys.stderr)
        self.dim = _colors_on(self.side.stream)
        self.printed = False  # answer text went out since the last line end we wrote
        self.in_reasoning = False

    def event(self, event: Event, generation_id: str | None = None) -> None:
        """An event before the terminal one (``generation_id``: in a conversation)."""
        if self.as_json:
            body = {"text": event.text} if event.kind == "message" else {"data": event.data}
            self._line(self._head(event.id, event.kind, generation_id) | body)
        elif event.kind == "message":
            self.message(event.text)
        elif event.kind == "reasoning":
            self.reasoning(event.text)
        else:
            self._end_reasoning()
            self.side.end_line()
            self.side.write(side_line(event) + "\n")

    def message(self, text: str) -> None:
        if text:
            self._end_reasoning()
            self.out.write(text)
            self.printed = True

    def reasoning(self, text: str) -> None:
        if not self.in_reasoning:
            self.side.end_line()
            self.in_reasoning = True
            text = "[reasoning] " + text
        self.side.write(f"{DIM}{text}{UNDIM}" if self.dim else text)

    def _end_reasoning(self) -> None:
        if self.in_reasoning:
            self.in_reasoning = False
            self.side.end_line()

    def end(self, event_id: str | None, finish_reason: str, usage: dict[str, Any] | None,
            generation_id: str | None = None) -> None:
        if self.as_json:
            self._line(self._head(event_id, "end", generation_id)
                       | {"finish_reason": finish_reason, "usage": usage})
        else:
            self._finish_lines()
            if self.side is not self.out:  # v1: a pipe gets the answer and one newline
                self.out.write("\n")
        self.printed = False

    def failed(self, event_id: str | None, code: str, message: str,
               generation_id: str | None = None) -> None:
        if self.as_json:
            self._line(self._head(event_id, "error", generation_id)
                       | {"error": {"code": code, "message": message}})
        self.stopped()

    def turn(self, event_id: str, number: int, generation_id: str, status: Any) -> None:
        """A conversation's next turn begins (``broker tail --conversation``)."""
        if self.as_json:
            self._line(self._head(event_id, "turn", generation_id)
                       | {"turn": number, "status": status})
        else:
            self.stopped()
            self.out.write(f"── turn {number} ({generation_id}) ──\n")

    @staticmethod
    def _head(event_id: str | None, kind: str, generation_id: str | None) -> dict[str, Any]:
        head = {"id": event_id, "event": kind}
        return head if generation_id is None else head | {"generation_id": generation_id}

    def stopped(self) -> None:
        """Ends a partial answer with a newline, so the shell prompt starts on its own line."""
        if not self.as_json:
            self._finish_lines()
            if self.printed:
                self.out.write("\n")
                self.printed = False

    def _finish_lines(self) -> None:
        """Ends what the side stream left open; on a terminal, the answer's line too."""
        self._end_reasoning()
        self.side.end_line()
        if self.side is self.out:
            self.printed = False

    def _line(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj) + "\n")


def _error(status: int, code: str, message: str) -> int:
    print(f"error: {code}: {message}", file=sys.stderr, flush=True)
    return status


def _base_url(args: argparse.Namespace) -> str | None:
    url = args.url or os.environ.get("BROKER_URL") or DEFAULT_URL
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return None
    return url if parsed.scheme in ("http", "https") and parsed.host else None


def _client(base_url: str, api_key: str | None = None) -> httpx.AsyncClient:
    # Reads wait past the edge's keepalive comments (every <= 15 s by contract); a dropped or
    # silent connection is the Follower's to resume.
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=httpx.Timeout(30.0, connect=10.0)
    )


async def _follow(follower: Follower, printer: Printer) -> int:
    """Prints the generation to its terminal event; the exit status says how it ended."""
    try:
        # aclosing: a failed write (stdout closed) closes the stream here, not at exit.
        async with contextlib.aclosing(follower.events()) as events:
            async for event in events:
                printer.event(event)
    except GenerationFailed as e:
        printer.failed(follower.last_event_id, e.code, e.message)
        return _error(EXIT_FAILED, e.code, e.message)
    except GenerationNotFound:
        printer.stopped()
        return _error(EXIT_UNAVAILABLE, "not_found", "no such generation (unknown or expired)")
    except RequestRejected as e:
        printer.stopped()
        gone = e.status in (404, 410)  # 410 history_lost: the start is no longer kept
        hint = AUTH_HINT if e.status in (401, 403) else ""
        return _error(EXIT_UNAVAILABLE if gone else EXIT_REJECTED, e.code, e.message + hint)
    except StreamError as e:
        printer.stopped()
        return _error(EXIT_UNAVAILABLE, "unavailable", str(e))
    result = follower.result
    assert result is not None
    printer.end(follower.last_event_id, result.finish_reason, result.usage)
    return EXIT_OK


def _unreachable(base_url: str, e: BaseException) -> str:
    """What failed reaching the edge; for a certificate it does not trust, what to do."""
    message = f"{base_url}: {e or type(e).__name__}"
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return message + UNTRUSTED_HINT
        cause = cause.__cause__ or cause.__context__
    return message + (UNTRUSTED_HINT if "CERTIFICATE_VERIFY_FAILED" in str(e) else "")


async def ask(args: argparse.Namespace, printer: Printer) -> int:
    base_url = _base_url(args)
    if base_url is None:
        return _error(EXIT_REJECTED, "invalid_url", "--url / BROKER_URL must be http(s)://host")
    messages = [{"role": "user", "content": args.question}]
    if args.system is not None:
        messages.insert(0, {"role": "system", "content": args.system})
    fields = {} if args.model is None else {"model": args.model}
    if args.conversation is not None:
        fields["conversation_id"] = args.conversation
    async with _client(base_url, args.api_key or os.environ.get("BROKER_API_KEY")) as http:
        try:
            created = await create(http, messages, **fields)
        except RequestRejected as e:
            status = EXIT_UNAVAILABLE if e.status >= 500 else EXIT_REJECTED
            hint = {401: " (pass --api-key or set BROKER_API_KEY)",
                    404: f" (no broker API at {base_url}: --url / BROKER_URL is the edge's base "
                         "URL, e.g. http://127.0.0.1:8000)"}.get(e.status, "")
            return _error(status, e.code, e.message + hint)
        except httpx.HTTPError as e:
            return _error(EXIT_UNAVAILABLE, "unavailable", _unreachable(base_url, e))
        # First, so `broker tail` (the id) or curl and a browser (the URL) can pick it up.
        print(created.id, file=sys.stderr, flush=True)
        print(base_url.rstrip("/") + created.events_url, file=sys.stderr, flush=True)
        if created.conversation_url is not None:
            # The conversation's stream, its token in it: for devices without a producer key.
            print(base_url.rstrip("/") + created.conversation_url, file=sys.stderr, flush=True)
        return await _follow(Follower(http, created.events_url), printer)


async def tail(args: argparse.Namespace, printer: Printer) -> int:
    base_url = _base_url(args)
    if base_url is None:
        return _error(EXIT_REJECTED, "invalid_url", "--url / BROKER_URL must be http(s)://host")
    if args.conversation is not None:
        return await tail_conversation(args, printer, base_url)
    if args.id is None:
        return _error(EXIT_REJECTED, "usage", "give a generation ID, or --conversation CID")
    token = args.token or os.environ.get("BROKER_VIEWER_TOKEN")
    async with _client(base_url, args.api_key or os.environ.get("BROKER_API_KEY")) as http:
        try:
            events_url = await _events_url(http, args.id, token)
        except GenerationNotFound:
            return _error(EXIT_UNAVAILABLE, "not_found", "no such generation (unknown or expired)")
        except httpx.HTTPError as e:
            return _error(EXIT_UNAVAILABLE, "unavailable", _unreachable(base_url, e))
        return await _follow(Follower(http, events_url, last_event_id=args.from_id), printer)


async def tail_conversation(args: argparse.Namespace, printer: Printer, base_url: str) -> int:
    """Every turn of a conversation as it comes, until Ctrl-C (or ``--turns`` turns ended)."""
    if not protocol.is_conversation_id(args.conversation):
        # Said here: the edge would answer a stream refused for want of a token, or a 404.
        return _error(EXIT_REJECTED, "invalid_conversation_id",
                      "--conversation must be 1-128 characters of A-Z a-z 0-9 _ . : -")
    token = args.token or os.environ.get("BROKER_VIEWER_TOKEN")
    ended = 0
    async with _client(base_url, args.api_key or os.environ.get("BROKER_API_KEY")) as http:
        try:
            events_url = await _conversation_url(http, args.conversation, token)
            follower = ConversationFollower(http, events_url, last_event_id=args.from_id)
            async with contextlib.aclosing(follower.__aiter__()) as events:
                async for event in events:
                    data, generation_id = event.data, event.generation_id
                    if event.event == "turn":
                        printer.turn(event.id, int(data.get("turn", 0)), generation_id,
                                     data.get("status"))
                    elif event.event == "end":
                        printer.end(event.id, data.get("finish_reason", "unknown"),
                                    data.get("usage"), generation_id)
                    elif event.event == "error":
                        # One turn failed; the conversation goes on.
                        code, message = data.get("code", "unknown"), data.get("message", "")
                        printer.failed(event.id, code, message, generation_id)
                        print(f"error: {code}: {message}", file=sys.stderr, flush=True)
                    else:  # the answer, reasoning, tool calls...: as in a generation's stream
                        printer.event(Event(event.event, event.id, data), generation_id)
                    if event.terminal:
                        ended += 1
                        if args.turns is not None and ended >= args.turns:
                            return EXIT_OK
        except RequestRejected as e:
            printer.stopped()
            hint = AUTH_HINT if e.status in (401, 403) else ""
            return _error(EXIT_REJECTED, e.code, e.message + hint)
        except (StreamError, httpx.HTTPError) as e:
            printer.stopped()
            return _error(EXIT_UNAVAILABLE, "unavailable", _unreachable(base_url, e))
    return EXIT_OK


async def _conversation_url(http: httpx.AsyncClient, cid: str, token: str | None) -> str:
    """As ``_events_url``, for a conversation (``GET /v1/conversations/{cid}``'s
    ``events_url``, which it answers for a conversation with no turn yet too; the plain URL
    when it cannot answer, e.g. without a producer key)."""
    conversation = f"/v1/conversations/{quote(cid, safe='')}"
    if token:
        return f"{conversation}/events?token={quote(token, safe='')}"
    response = await http.get(conversation)
    url = response.json().get("events_url") if response.status_code == 200 else None
    return url if isinstance(url, str) else f"{conversation}/events"


async def _events_url(http: httpx.AsyncClient, gen_id: str, token: str | None) -> str:
    """The stream's URL: with the viewer token given, else as the edge hands it to a producer
    (``GET /v1/generations/{id}`` answers ``events_url``, with a fresh token when tokens are
    on; no key is needed where producer keys are off, as in ``broker dev``)."""
    generation = f"/v1/generations/{quote(gen_id, safe='')}"
    if token:
        return f"{generation}/events?token={quote(token, safe='')}"
    response = await http.get(generation)
    if response.status_code == 404:
        raise GenerationNotFound(generation)
    url = response.json().get("events_url") if response.status_code == 200 else None
    # Without it (refused: no key, yet the stream may be open to all; failing; an older edge)
    # the plain URL: the stream itself then says what is wrong.
    return url if isinstance(url, str) else f"{generation}/events"


def add_client_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "ask":
        parser.add_argument("question", help="the question (the user message)")
        parser.add_argument("--model", help="model to ask (default: the edge's BROKER_MODEL)")
        parser.add_argument("--system", metavar="TEXT", help="a system message before it")
        parser.add_argument("--conversation", metavar="CID", help="ask it as the next turn of "
                            "this conversation (`broker tail --conversation CID` follows it)")
    else:
        parser.add_argument("id", metavar="ID", nargs="?", help="the generation's id "
                            "(`broker ask` prints it on stderr)")
        parser.add_argument("--conversation", metavar="CID", help="follow this conversation "
                            "instead: every turn, live, until Ctrl-C (--from: a conversation "
                            "event id)")
        parser.add_argument("--turns", type=int, metavar="N", help="with --conversation: exit "
                            "once N turns have ended")
        parser.add_argument("--from", dest="from_id", metavar="EVENT_ID",
                            help="resume: print only what follows this event id "
                            "(default: from the start)")
        parser.add_argument("--token", help="the viewer token (the `token` of the create "
                            "answer's events_url); without it, tail asks the edge for the "
                            "events_url (with --api-key where keys are on) "
                            "[env BROKER_VIEWER_TOKEN]")
    parser.add_argument("--api-key", help="a producer API key, when the edge requires one "
                        "[env BROKER_API_KEY]")
    parser.add_argument("--url", help=f"base URL of an edge or its load balancer "
                        f"[env BROKER_URL; default {DEFAULT_URL}]")
    parser.add_argument("--json", action="store_true", help="print one JSON object per event "
                        "line, each with `id` and `event` (its kind): {id, event, text} per "
                        "message, {id, event, data} per reasoning, tool_call, tool_result and "
                        "data event, then {id, event, finish_reason, usage} or {id, event, "
                        "error}. Plain output: the answer alone on stdout; reasoning and one "
                        "line per tool call/result/data event on stderr (on a terminal: all on "
                        "it, the reasoning dimmed)")


ClientCommand = Callable[[argparse.Namespace, Printer], Coroutine[Any, Any, int]]
CLIENT_COMMANDS: dict[str, tuple[ClientCommand, str]] = {
    "ask": (ask, "ask a question: create a generation and print its answer as it streams"),
    "tail": (tail, "follow a generation from the start, or from an event id, to its end; or "
                   "every turn of a conversation (--conversation)"),

}


def run_client(command: ClientCommand, args: argparse.Namespace) -> int:
    printer = Printer(args.json)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character
    try:
        return asyncio.run(command(args, printer))
    except KeyboardInterrupt:
        printer.stopped()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # no second error when Python flushes
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
