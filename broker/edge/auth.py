"""Who may do what: API keys for producers, signed viewer tokens for streams.

Producers (the chat product's backend) send ``Authorization: Bearer <key>`` to create, read and
cancel generations. Viewers (browsers) cannot send headers from ``EventSource``, so the create
answer's ``events_url`` carries a viewer token: an HMAC over the generation id and an expiry.
A token opens the stream of its own generation only, until it expires. Several keys of each
kind may be configured at once, so they can be rotated without downtime: every key verifies,
the first viewer-token key signs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path

from broker.edge.errors import ApiError

TOKEN_PARAM = "token"
TOKEN_COOKIE_PREFIX = "broker_token_"  # + the generation id, for EventSource withCredentials
CONVERSATION_COOKIE_PREFIX = "broker_conversation_token_"  # + the conversation id, likewise
_KEY_ID_CHARS = 8


def key_id(secret: str) -> str:
    """A short public name for a key (in logs, quotas, tokens): never the key itself."""
    return hashlib.sha256(secret.encode()).hexdigest()[:_KEY_ID_CHARS]


def parse_keys(inline: str, path: str = "") -> list[str]:
    """Keys from a comma-separated setting and/or a file of one key per line (``#`` comments)."""
    keys = [k.strip() for k in inline.split(",") if k.strip()]
    if path:
        for line in Path(path).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
    return keys


class ApiKeys:
    """The producer keys; ``None`` from ``check`` when auth is off (insecure or dev mode)."""

    def __init__(self, keys: list[str]) -> None:
        self._by_id = {key_id(k): k.encode() for k in keys}

    @property
    def enabled(self) -> bool:
        return bool(self._by_id)

    def check(self, authorization: str | None) -> str | None:
        """The key id of a valid ``Bearer`` header; 401 otherwise. ``None`` if auth is off."""
        if not self.enabled:
            return None
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ApiError(401, "unauthorized", "send an API key: Authorization: Bearer <key>")
        candidate = presented.strip().encode()
        for kid, secret in self._by_id.items():
            if hmac.compare_digest(candidate, secret):
                return kid
        raise ApiError(401, "unauthorized", "the API key is not valid")


class ViewerTokens:
    """Signs and checks viewer tokens: ``<key id>.<expiry>.<signature>``, URL-safe."""

    def __init__(self, keys: list[str], ttl: float) -> None:
        self._keys = [(key_id(k), k.encode()) for k in keys]
        self.ttl = ttl

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def issue(self, gen_id: str, now: float | None = None) -> str:
        kid, secret = self._keys[0]
        expires = int((time.time() if now is None else now) + self.ttl)
        return f"{kid}.{expires}.{_sign(secret, gen_id, expires)}"

    def check(self, token: str | None, gen_id: str, now: float | None = None) -> None:
        """Pass, or 401 (no token) / 403 (wrong, expired, another generation's). The answer is
        the same whether or not ``gen_id`` exists, so a token probe learns nothing."""
        if not self.enabled:
            return
        if not token:
            raise ApiError(401, "unauthorized", "this stream needs a viewer token (?token=)")
        kid, _, rest = token.partition(".")
        expiry, _, signature = rest.partition(".")
        # Compared as bytes: compare_digest refuses non-ASCII str (a 500 the fuzzer found).
        secret = next(
            (s for k, s in self._keys if hmac.compare_digest(k.encode(), kid.encode())), None
        )
        valid_expiry = expiry.isascii() and expiry.isdigit() and len(expiry) <= 12
        if secret is None or not valid_expiry or not hmac.compare_digest(
            signature.encode(), _sign(secret, gen_id, int(expiry)).encode()
        ):
            raise ApiError(403, "forbidden", "the viewer token is not valid for this stream")
        if int(expiry) < (time.time() if now is None else now):
            raise ApiError(403, "token_expired", "the viewer token has expired")


def conversation_scope(cid: str) -> str:
    """What a conversation's viewer token signs in place of a generation id: no generation id
    has a ``:``, so a conversation's token never opens a generation (nor one conversation's
    another: the cid is signed whole)."""
    return "conversation:" + cid


def _sign(secret: bytes, gen_id: str, expires: int) -> str:
    mac = hmac.new(secret, f"{gen_id}.{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
