"""The edge's CORS policy (``BROKER_CORS_ORIGINS``), in one place: Starlette's CORS middleware
applies it to every route but the event stream, which the edge serves before routing
(``broker.edge.app.EdgeApp``); ``simple_headers`` runs the same middleware over an empty answer
to learn the headers the stream's answer carries."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.edge.errors import error_response

METHODS = ("GET", "POST")
HEADERS = ("authorization", "content-type", "last-event-id")
EXPOSE = ("location", "retry-after")
MAX_AGE = 600


class CorsPolicy:
    def __init__(self, setting: str) -> None:
        self.origins = [o.strip() for o in setting.split(",") if o.strip()]
        self.allow_all = "*" in self.origins
        # Credentials (cookies) only for named origins: never for "*".
        self.credentials = not self.allow_all
        # The middleware around an empty answer: the CORS headers of a simple request.
        self._answer_headers: ASGIApp | None = None
        for middleware in self.middleware():
            self._answer_headers = middleware.cls(_empty_answer, *middleware.args,
                                                  **middleware.kwargs)

    def middleware(self) -> list[Middleware]:
        """What every route but the stream goes through (none without origins)."""
        if not self.origins:
            return []
        return [Middleware(
            JsonCORSMiddleware, allow_origins=self.origins, allow_credentials=self.credentials,
            allow_methods=list(METHODS), allow_headers=list(HEADERS), expose_headers=list(EXPOSE),
            max_age=MAX_AGE,
        )]

    async def simple_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """The CORS headers of an answer to a request that is not a preflight (the stream's):
        what the middleware itself adds, run over an empty answer, so the stream's rules are
        Starlette's whatever its version (they changed: ``Vary``, cookies)."""
        if self._answer_headers is None:
            return []
        headers: list[tuple[bytes, bytes]] = []

        async def capture(message: Message) -> None:
            headers.extend(message["headers"])

        await self._answer_headers(scope, _no_body, capture)
        return headers


async def _empty_answer(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})


async def _no_body() -> Message:
    return {"type": "http.request", "body": b""}


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, its refused preflights answered in the edge's JSON error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        kept = {name: value for name, value in response.headers.items()
                if name not in ("content-type", "content-length")}
        reason = bytes(response.body).decode(errors="replace")  # "Disallowed CORS origin, ..."
        return error_response(response.status_code, "cors_refused",
                              f"CORS preflight refused: {reason}", kept)
