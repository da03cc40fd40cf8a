"""Python clients of an edge: ``create``, ``Follower`` and ``ConversationFollower``
(``broker.client.follower``), and
the terminal's ``broker ask``/``broker tail`` (``broker.client.terminal``). Imports
``broker.core`` at most."""

from broker.client.follower import (
    ConversationEvent,
    ConversationFollower,
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
    "ConversationEvent",
    "ConversationFollower",
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
