"""Python clients of an edge: ``create`` and ``Follower`` (``broker.client.follower``), and
the terminal's ``broker ask``/``broker tail`` (``broker.client.terminal``). Imports
``broker.core`` at most."""

from broker.client.follower import (
    Created,
    Event,
    Follower,
    GenerationFailed,
    GenerationNotFound,
    Message,
    RequestRejected,
    Result,
    StreamError,
    create,
)

__all__ = [
    "Created",
    "Event",
    "Follower",
    "GenerationFailed",
    "GenerationNotFound",
    "Message",
    "RequestRejected",
    "Result",
    "StreamError",
    "create",
]
