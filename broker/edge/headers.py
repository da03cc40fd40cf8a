"""Security headers: which answers carry which, set once per response (``broker.edge.app.EdgeApp``
and the server's own answers in ``broker.edge.uvicorn_extensions``), never per write of a stream."""

from __future__ import annotations

from starlette.types import Message, Send

# Every answer: a browser must not guess another content type than the one declared (a JSON
# error echoing input must never be sniffed as HTML).
NOSNIFF = (b"x-content-type-options", b"nosniff")

# The demo page and the static files: scripts, styles and connections from this origin only
# (the page has no inline script or style), no plugins, no <base> tricks, never in a frame
# (clickjacking), and no Referer to other sites.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
PAGE_HEADERS = [
    NOSNIFF,
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"referrer-policy", b"no-referrer"),
]
API_HEADERS = [NOSNIFF]


def for_path(path: str) -> list[tuple[bytes, bytes]]:
    """The headers an answer to ``path`` carries on top of its own."""
    if path == "/" or path.startswith("/static/"):
        return PAGE_HEADERS
    return API_HEADERS


def with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """``send``, adding ``extra`` to the response's headers as it starts (once per response;
    a stream's events are written past ``send`` altogether, see
    ``broker.edge.uvicorn_extensions``)."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return send_with_headers
