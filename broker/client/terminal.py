"""The terminal clients ``broker ask`` and ``broker tail``, built on ``broker.client``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

import httpx

from broker.client import (
    ConversationFollower,
    Follower,
    GenerationFailed,
    GenerationNotFound,
    RequestRejected,
    StreamError,
    create,
)

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_OK = 0  # the generation ended with `event: end` (any finish_reason, cancelled too)
EXIT_FAILED = 1  # it ended with `event: error`
EXIT_REJECTED = 2  # a usage error, or the edge refused the request (4xx)
EXIT_UNAVAILABLE = 3  # not found (404/410), or the edge unreachable / failing past the deadline
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_BROKEN_PIPE = 141  # stdout closed by the reader (`broker ask ... | head`)
AUTH_HINT = (" (pass --api-key or set BROKER_API_KEY, or the viewer token with --token or "
             "BROKER_VIEWER_TOKEN)")

CLIENT_EPILOG = """\
exit status:
  0    the generation ended (event: end; any finish_reason, cancelled included)
  1    the generation failed (event: error; `error: <code>: <message>` on stderr)
  2    usage error, or the edge rejected the request (4xx)
  3    generation not found (404/410), or the edge unreachable or failing too long
  130  interrupted (Ctrl-C); the generation goes on, `broker tail ID` follows it
"""


class Printer:
    """Writes a followed generation to stdout: its text as it arrives, or one JSON object per
    event (``{"id", "text"}`` per message, then ``{"finish_reason", "usage"}``)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.printed = False

    def message(self, event_id: str, text: str, generation_id: str | None = None) -> None:
        if self.as_json:
            line = {"id": event_id, "text": text}
            self._line(line if generation_id is None else line | {"generation_id": generation_id})
        elif text:
            self._write(text)
            self.printed = True

    def end(self, finish_reason: str, usage: dict[str, Any] | None,
            generation_id: str | None = None) -> None:
        if self.as_json:
            line = {"finish_reason": finish_reason, "usage": usage}
            self._line(line if generation_id is None else line | {"generation_id": generation_id})
        else:
            self._write("\n")
        self.printed = False

    def turn(self, number: int, generation_id: str) -> None:
        """A conversation's next turn begins (``broker tail --conversation``)."""
        if self.as_json:
            self._line({"turn": number, "generation_id": generation_id})
        else:
            self._write(f"── turn {number} ({generation_id}) ──\n")

    def failed(self, code: str, message: str) -> None:
        if self.as_json:
            self._line({"error": {"code": code, "message": message}})
        self.stopped()

    def stopped(self) -> None:
        """Ends a partial answer with a newline, so the shell prompt starts on its own line."""
        if self.printed and not self.as_json:
            self._write("\n")
            self.printed = False

    def _line(self, obj: dict[str, Any]) -> None:
        self._write(json.dumps(obj) + "\n")

    def _write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()


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
        async with contextlib.aclosing(follower.__aiter__()) as messages:
            async for message in messages:
                printer.message(message.id, message.text)
    except GenerationFailed as e:
        printer.failed(e.code, e.message)
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
    printer.end(result.finish_reason, result.usage)
    return EXIT_OK


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
            hint = " (pass --api-key or set BROKER_API_KEY)" if e.status == 401 else ""
            return _error(status, e.code, e.message + hint)
        except httpx.HTTPError as e:
            return _error(EXIT_UNAVAILABLE, "unavailable", f"{base_url}: {e or type(e).__name__}")
        # First, so `broker tail` (the id) or curl and a browser (the URL) can pick it up.
        print(created.id, file=sys.stderr, flush=True)
        print(base_url.rstrip("/") + created.events_url, file=sys.stderr, flush=True)
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
            return _error(EXIT_UNAVAILABLE, "unavailable", f"{base_url}: {e or type(e).__name__}")
        return await _follow(Follower(http, events_url, last_event_id=args.from_id), printer)


async def tail_conversation(args: argparse.Namespace, printer: Printer, base_url: str) -> int:
    """Every turn of a conversation as it comes, until Ctrl-C (or ``--turns`` turns ended)."""
    token = args.token or os.environ.get("BROKER_VIEWER_TOKEN")
    ended = 0
    async with _client(base_url, args.api_key or os.environ.get("BROKER_API_KEY")) as http:
        try:
            events_url = await _conversation_url(http, args.conversation, token)
            follower = ConversationFollower(http, events_url, last_event_id=args.from_id)
            async with contextlib.aclosing(follower.__aiter__()) as events:
                async for event in events:
                    data = event.data
                    if event.event == "turn":
                        printer.turn(int(data.get("turn", 0)), event.generation_id)
                    elif event.event == "message":
                        printer.message(event.id, data["text"], event.generation_id)
                    elif event.event == "end":
                        printer.end(data.get("finish_reason", "unknown"), data.get("usage"),
                                    event.generation_id)
                    elif event.event == "error":
                        # One turn failed; the conversation goes on.
                        code, message = data.get("code", "unknown"), data.get("message", "")
                        printer.failed(code, message)
                        print(f"error: {code}: {message}", file=sys.stderr, flush=True)
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
            return _error(EXIT_UNAVAILABLE, "unavailable", f"{base_url}: {e or type(e).__name__}")
    return EXIT_OK


async def _conversation_url(http: httpx.AsyncClient, cid: str, token: str | None) -> str:
    """As ``_events_url``, for a conversation (``GET /v1/conversations/{cid}``'s
    ``events_url``; the plain URL for a conversation with no turn yet)."""
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
                        "line: {id, text} per message, then {finish_reason, usage}")


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
