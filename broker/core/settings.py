"""One typed settings object. Every setting is an env var and a CLI flag; the flag wins."""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any


def _setting(
    default: Any, env: str, help: str, roles: str = "edge worker dev", shown: str | None = None
) -> Any:
    """A setting; ``shown`` is its default as ``--help`` says it, when the field's own default
    (``None``: resolved at startup) would not say it."""
    metadata = {"env": env, "help": help, "roles": roles.split(), "shown_default": shown}
    return field(default=default, metadata=metadata)


# The worker's /metrics port when none is set, then the ones it tries in turn when that one is
# taken (another worker on the same host): see worker/metrics_server.py.
WORKER_METRICS_PORTS = range(9100, 9200)


@dataclass(frozen=True)
class Settings:
    redis_url: str = _setting(
        "redis://localhost:6379/0", "REDIS_URL",
        "Redis to use; `redis+cluster://host:port[,host:port...]` for a Redis Cluster "
        "(several seeds: any one up is enough to start)", "edge worker"
    )
    host: str = _setting(
        "127.0.0.1", "BROKER_HOST",
        "address the HTTP server binds (worker: its /metrics; cluster: HAProxy)",
        "edge worker dev mock cluster",
    )
    port: int = _setting(
        8000, "BROKER_PORT", "port the HTTP server listens on (cluster: HAProxy)",
        "edge dev mock cluster",
    )
    openai_base_url: str | None = _setting(
        None, "OPENAI_BASE_URL", "OpenAI-compatible API base URL (SDK default if unset)",
        "worker dev cluster",
    )
    openai_api_key: str | None = _setting(
        None, "OPENAI_API_KEY",
        "API key for the LLM; without one `broker dev` calls OPENAI_BASE_URL keyless (a "
        "local server) if set, else its mock LLM, and `broker cluster` its mock LLM",
        "worker dev cluster",
    )
    model: str = _setting(
        "gpt-4o-mini", "BROKER_MODEL", "model when a request names none", "edge worker dev cluster"
    )
    flush_interval: float = _setting(
        1.5, "BROKER_FLUSH_INTERVAL", "the longest any text waits in the sentence buffer, "
        "seconds (the wait for a sentence end adapts to the token rate below it)", "worker dev"
    )
    first_text_wait: float = _setting(
        0.01, "BROKER_FIRST_TEXT_WAIT", "seconds the first text of an answer waits after its "
        "first token, at most", "worker dev"
    )
    max_message_chars: int = _setting(
        400, "BROKER_MAX_MESSAGE_CHARS", "flush a message at this size even mid-sentence",
        "worker dev",
    )
    keepalive_interval: float = _setting(
        10.0, "BROKER_KEEPALIVE_INTERVAL", "seconds between SSE comment lines on an idle stream",
        "edge dev",
    )
    probe_interval: float = _setting(
        1.0, "BROKER_PROBE_INTERVAL", "seconds between delivery probes; /readyz fails after 3 lost",
        "edge dev",
    )
    retry_ms: int = _setting(
        1000, "BROKER_RETRY_MS", "reconnect delay the SSE stream advises (`retry:`)", "edge dev"
    )
    retention_ttl: float = _setting(
        86400.0, "BROKER_RETENTION_TTL", "seconds a generation's keys live after its last event"
    )
    max_log_length: int = _setting(
        10000, "BROKER_MAX_LOG_LENGTH", "events kept per generation log (older ones are trimmed)",
        "worker edge dev",
    )
    job_shards: int = _setting(
        1, "BROKER_JOB_SHARDS", "job queue streams (spread over Redis Cluster nodes); "
        "every edge and worker must agree", "edge worker dev",
    )
    max_concurrency: int = _setting(
        64, "BROKER_MAX_CONCURRENCY", "generations one worker runs at once", "worker dev"
    )
    max_body_bytes: int = _setting(
        1 << 20, "BROKER_MAX_BODY_BYTES", "largest accepted request body", "edge dev"
    )
    lease_ttl: float = _setting(
        5.0, "BROKER_LEASE_TTL", "seconds a worker's lease on a generation lasts unrenewed",
        "worker dev",
    )
    admit_max_lag: float = _setting(
        0.05, "BROKER_ADMIT_MAX_LAG", "a worker takes no new job while its event loop runs "
        "this many seconds late or its publishes take this long (measured; jobs stay queued "
        "for other workers; 0: no limit but BROKER_MAX_CONCURRENCY)", "worker dev",
    )
    producer_lease: float = _setting(
        30.0, "BROKER_PRODUCER_LEASE", "seconds an external producer's generation lives "
        "without an append or a heartbeat (then it ends with producer_lost)", "edge dev",
    )
    llm_idle_timeout: float = _setting(
        60.0, "BROKER_LLM_IDLE_TIMEOUT", "seconds without a token before the LLM call fails",
        "worker dev",
    )
    llm_max_retries: int = _setting(
        2, "BROKER_LLM_MAX_RETRIES", "retries of the LLM request before its first token",
        "worker dev",
    )
    drain_timeout: float = _setting(
        30.0, "BROKER_DRAIN_TIMEOUT", "seconds a stopping worker lets generations finish",
        "worker dev",
    )
    replay_window: int = _setting(
        512, "BROKER_REPLAY_WINDOW", "recent events an edge keeps in memory per generation",
        "edge dev",
    )
    send_timeout: float = _setting(
        30.0, "BROKER_SEND_TIMEOUT", "seconds a viewer may block a write before it is closed",
        "edge dev",
    )
    redis_pool_size: int = _setting(
        16, "BROKER_REDIS_POOL_SIZE", "Redis connections per process (pub/sub has its own)",
        "edge worker",
    )
    # None (unset) is not 9100: set, the port must be free; unset, the worker may move on.
    worker_metrics_port: int | None = _setting(
        None, "BROKER_WORKER_METRICS_PORT", "port of the worker's own /metrics (0: none); "
        "unset and 9100 taken: the next free port up to 9199, logged", "worker",
        shown=str(WORKER_METRICS_PORTS[0]),
    )
    worker_id: str = _setting(
        "", "BROKER_WORKER_ID", "consumer name in the jobs group (default: host-pid-random)",
        "worker dev",
    )
    log_level: str = _setting(
        "info", "BROKER_LOG_LEVEL", "logging level", "edge worker dev mock cluster"
    )
    log_format: str = _setting(
        "text", "BROKER_LOG_FORMAT", "`text` or `json` (one JSON object per line)",
        "edge worker dev mock cluster",
    )
    log_prompts: bool = _setting(
        False, "BROKER_LOG_PROMPTS", "log each generation's prompt messages (off: never)",
        "edge dev",
    )
    # -- who may do what (docs/security.md) --
    insecure: bool = _setting(
        False, "BROKER_INSECURE", "run the edge without API keys and viewer tokens (loudly)",
        "edge",
    )
    api_keys: str = _setting(
        "", "BROKER_API_KEYS", "producer API keys, comma-separated (any one is accepted)",
        "edge dev",
    )
    api_keys_file: str = _setting(
        "", "BROKER_API_KEYS_FILE", "file of producer API keys, one per line", "edge dev"
    )
    viewer_token_keys: str = _setting(
        "", "BROKER_VIEWER_TOKEN_KEYS",
        "viewer-token signing keys, comma-separated: the first signs, all verify", "edge dev",
    )
    viewer_token_ttl: float = _setting(
        86400.0, "BROKER_VIEWER_TOKEN_TTL", "seconds a viewer token in `events_url` stays "
        "valid (longer than a stream may be watched, resumes included)",
        "edge dev",
    )
    cors_origins: str = _setting(
        "", "BROKER_CORS_ORIGINS", "origins allowed to call the API from a browser, "
        "comma-separated (none: no CORS headers)", "edge dev",
    )
    # -- limits --
    max_messages: int = _setting(
        256, "BROKER_MAX_MESSAGES", "messages one create request may carry", "edge dev"
    )
    max_content_chars: int = _setting(
        200_000, "BROKER_MAX_CONTENT_CHARS", "characters of one message's content", "edge dev"
    )
    max_viewers: int = _setting(
        10_000, "BROKER_MAX_VIEWERS", "open streams per edge; more get 503 + Retry-After",
        "edge dev",
    )
    max_queued_per_key: int = _setting(
        1000, "BROKER_MAX_QUEUED_PER_KEY", "generations one API key may have waiting for a "
        "worker; more get 429", "edge dev",
    )
    max_stream_seconds: float = _setting(
        3600.0, "BROKER_MAX_STREAM_SECONDS", "a stream is closed after this long (EventSource "
        "resumes it)", "edge dev",
    )
    request_timeout: float = _setting(
        10.0, "BROKER_REQUEST_TIMEOUT", "seconds a client may take to send request headers, "
        "and a body", "edge dev",
    )
    # 64 KiB: above what any browser sends with its cookies (each cookie at most 4 KiB; most
    # servers and proxies in front stop at 8-32 KiB), so whatever reached the edge through one
    # of them fits; small enough that parsing it costs nothing.
    max_header_bytes: int = _setting(
        65536, "BROKER_MAX_HEADER_BYTES", "bytes of a request head (request line and headers); "
        "more get 431", "edge dev",
    )
    max_headers: int = _setting(
        100, "BROKER_MAX_HEADERS", "header lines of a request; more get 431", "edge dev",
    )
    edge_workers: int = _setting(
        1, "BROKER_EDGE_WORKERS", "edge processes serving the one port (one per core); each "
        "holds its own subscriptions", "edge",
    )

    def worker_name(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ) if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = _convert(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        _check_ranges(settings)
        return settings


# Settings whose value outside a range would make no sense (a negative wait): name -> (lowest
# allowed, whether that lowest value itself is allowed).
_RANGES: dict[str, tuple[float, bool]] = {
    "flush_interval": (0.0, False),
    "workers": (1.0, True),
    "first_text_wait": (0.0, True),
    "admit_max_lag": (0.0, True),
    "producer_lease": (0.0, False),
}


def _check_ranges(settings: Settings) -> None:
    for f in dataclasses.fields(settings):
        if f.name not in _RANGES:
            continue
        lowest, inclusive = _RANGES[f.name]
        value = getattr(settings, f.name)
        if value < lowest or (value == lowest and not inclusive):
            expected = f">= {lowest:g}" if inclusive else f"> {lowest:g}"
            raise SystemExit(f"{f.metadata['env']}: expected a number {expected}, got {value}")


def _base_type(f: dataclasses.Field[Any]) -> type:
    annotation = str(f.type)
    for name, typ in (("int", int), ("float", float), ("bool", bool)):
        if annotation.startswith(name):
            return typ
    return str


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    if _base_type(f) is bool:
        if raw.strip().lower() not in _TRUE | _FALSE:
            raise SystemExit(f"{f.metadata['env']}: expected 1/0/true/false, got {raw!r}")
        return raw.strip().lower() in _TRUE
    try:
        return _base_type(f)(raw)
    except ValueError as e:
        expected = _base_type(f).__name__
        raise SystemExit(f"{f.metadata['env']}: expected {expected}, got {raw!r}") from e


def add_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    """One ``--flag`` per setting of ``role``; unset flags fall back to the env var."""
    for f in dataclasses.fields(Settings):
        if role not in f.metadata["roles"]:
            continue
        default = f.metadata["shown_default"] or (
            f.default if f.default not in ("", None) else "unset"
        )
        if _base_type(f) is bool:  # a switch: present means on
            parser.add_argument(
                "--" + f.name.replace("_", "-"), dest=f.name, action="store_const", const=True,
                default=None, help=f"{f.metadata['help']} [env {f.metadata['env']}]",
            )
            continue
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_base_type(f),
            default=None,
            help=f"{f.metadata['help']} [env {f.metadata['env']}; default {default}]",
        )


def from_args(args: argparse.Namespace) -> Settings:
    names = {f.name for f in dataclasses.fields(Settings)}
    return Settings.from_env(**{k: v for k, v in vars(args).items() if k in names})
