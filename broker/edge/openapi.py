"""The OpenAPI 3.1 document of the edge's HTTP API, served at ``/openapi.json``.

Written by hand from docs/api.md (the routes are plain Starlette): ``tests/integration/
test_api_fuzz.py`` fuzzes a live edge from it with schemathesis, which also checks every
answer against it, so it cannot drift from what the edge does.
"""

from __future__ import annotations

from typing import Any

from broker.core.protocol import CONTENT_KINDS, MAX_TOOL_CALL_INDEX, SDK_CALL_OPTIONS
from broker.core.settings import Settings
from broker.edge.validation import MAX_APPEND_EVENTS, MAX_JSON_DEPTH, MAX_MODEL_CHARS

_ERROR = {"$ref": "#/components/schemas/Error"}
_GEN_ID = {
    "name": "gen_id", "in": "path", "required": True,
    "schema": {"type": "string"}, "description": "the generation id (22 URL-safe characters)",
}


_CID = {
    "name": "cid", "in": "path", "required": True, "schema": {"type": "string"},
    "description": "the conversation id (1-128 of A-Z a-z 0-9 _ . : -)",
}
CONVERSATION_ID_SCHEMA = {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"}


def _errors(*codes: int) -> dict[str, Any]:
    descriptions = {
        400: "malformed JSON or Last-Event-ID", 401: "no valid API key or viewer token",
        403: "the viewer token is wrong, expired or for another generation (a producer "
             "endpoint: another API key created it)",
        404: "no such generation", 405: "method not allowed", 408: "the body was too slow",
        409: "the generation already ended (a producer endpoint: offset_mismatch, cancelled, "
             "already_finished, not_external; with 'count')",
        410: "the history to resume from is gone",
        413: "the body is too large", 422: "the request has the wrong shape",
        429: "this API key has too many generations waiting",
        503: "Redis is unavailable, or this edge serves as many streams as it may",
    }
    return {
        str(code): {
            "description": descriptions[code],
            "content": {"application/json": {"schema": _ERROR}},
        }
        for code in codes
    }


def document(settings: Settings) -> dict[str, Any]:
    tool_call = {
        "type": "object", "required": ["index", "id", "name", "arguments"],
        "properties": {"index": {"type": "integer"}, "id": {"type": "string"},
                       "name": {"type": "string"},
                       "arguments": {"type": "string",
                                     "description": "the exact concatenation of the LLM's "
                                                    "argument fragments"}},
    }
    generation = {
        "type": "object",
        "required": ["id", "status", "text", "reasoning", "tool_calls", "events",
                     "finish_reason", "model", "created_ms", "events_url"],
        "properties": {
            "id": {"type": "string"},
            "status": {"enum": ["queued", "running", "completed", "failed", "cancelled"]},
            "text": {"type": "string", "description": "the answer's messages so far, joined"},
            "reasoning": {"type": "string",
                          "description": "the reasoning events' texts so far, joined"},
            "tool_calls": {"type": "array", "items": tool_call,
                           "description": "the complete tool calls so far, in order"},
            "events": {
                "type": "object", "required": list(CONTENT_KINDS),
                "properties": {kind: {"type": "integer", "minimum": 0}
                               for kind in CONTENT_KINDS},
                "description": "how many events of each kind were published so far",
            },
            "finish_reason": {"type": ["string", "null"]},
            "model": {"type": "string"},
            "created_ms": {"type": "integer"},
            "events_url": {"type": "string",
                           "description": "the stream, with a fresh viewer token if tokens are on"},
            "producer": {"const": "external",
                         "description": "only for an external producer's generation"},
            "metadata": {"type": "object",
                         "description": "an external producer's create metadata"},
        },
    }
    conversation = {
        "type": "object", "required": ["id", "turns", "active", "events_url"],
        "properties": {
            "id": {"type": "string"},
            "turns": {"type": "array", "items": {
                "type": "object", "required": ["generation_id", "turn", "status"],
                "properties": {
                    "generation_id": {"type": "string"}, "turn": {"type": "integer"},
                    "status": {"enum": ["queued", "running", "completed", "failed",
                                        "cancelled", "expired"]},
                },
            }},
            "active": {"type": ["string", "null"],
                       "description": "the oldest turn that has not ended"},
            "events_url": {"type": "string"},
        },
    }
    message = {
        "type": "object", "required": ["role", "content"],
        "properties": {
            "role": {"type": "string"},
            "content": {"type": "string", "maxLength": settings.max_content_chars},
        },
    }
    create_body = {
        "type": "object", "required": ["messages"],
        "properties": {
            "messages": {"type": "array", "items": message, "minItems": 1,
                         "maxItems": settings.max_messages},
            "model": {"type": "string", "pattern": "\\S", "maxLength": MAX_MODEL_CHARS},
            "n": {"const": 1},
            "conversation_id": CONVERSATION_ID_SCHEMA,
            # Options of the worker's SDK call, not request fields: never accepted.
            **dict.fromkeys(sorted(SDK_CALL_OPTIONS), False),
        },
        "additionalProperties": True,
        "description": "an OpenAI chat-completions request; other fields pass through to the LLM "
                       f"(JSON nested at most {MAX_JSON_DEPTH} levels, finite numbers only)",
    }
    external_create = {
        "type": "object", "required": ["producer"],
        "properties": {
            "producer": {"const": "external"},
            "model": {"type": "string", "pattern": "\\S", "maxLength": MAX_MODEL_CHARS},
            "metadata": {"type": "object", "description": "kept, shown by GET"},
            "messages": {"description": "ignored: the producer runs its own loop"},
        },
        "additionalProperties": False,
        "description": "an external producer's generation: it appends the events itself",
    }
    text_event = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
                  "properties": {"type": {"enum": ["text", "reasoning"]},
                                 "text": {"type": "string", "minLength": 1}}}
    tool_call_event = {
        "type": "object", "required": ["type", "index", "id", "name", "arguments"],
        "additionalProperties": False,
        "properties": {"type": {"const": "tool_call"}, "index": {"type": "integer", "minimum": 0,
                                                           "maximum": MAX_TOOL_CALL_INDEX},
                       "id": {"type": "string"}, "name": {"type": "string", "minLength": 1},
                       "arguments": {"type": "string"}},
    }
    tool_result_event = {
        "type": "object", "required": ["type", "id", "result"], "additionalProperties": False,
        "properties": {"type": {"const": "tool_result"}, "id": {"type": "string"},
                       "result": {}},
    }
    data_event = {
        "type": "object", "required": ["type", "name", "value"], "additionalProperties": False,
        "properties": {"type": {"const": "data"}, "name": {"type": "string", "minLength": 1},
                       "value": {}},
    }
    append_body = {
        "type": "object", "required": ["after", "events"], "additionalProperties": False,
        "properties": {
            "after": {"type": "integer", "minimum": 0,
                      "description": "how many events you appended before this batch"},
            "events": {"type": "array", "minItems": 1, "maxItems": MAX_APPEND_EVENTS,
                       "items": {"anyOf": [text_event, tool_call_event, tool_result_event,
                                           data_event]}},
        },
    }
    finish_body = {"anyOf": [
        {"type": "object", "additionalProperties": False,
         "properties": {"finish_reason": {"type": "string", "pattern": "\\S", "maxLength": 128},
                        "usage": {"type": ["object", "null"]}}},
        {"type": "object", "required": ["error"], "additionalProperties": False,
         "properties": {"error": {
             "type": "object", "additionalProperties": False,
             "properties": {"code": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,63}$"},
                            "message": {"type": "string"}}}}},
    ]}
    count = {"type": "object", "required": ["count"],
             "properties": {"count": {"type": "integer", "minimum": 0}}}

    def producer_endpoint(summary: str, body: dict[str, Any] | None, answer: dict[str, Any],
                          *errors: int) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "summary": summary, "security": [{"apiKey": []}], "parameters": [_GEN_ID],
            "responses": {"200": {"description": "done", "content": {
                "application/json": {"schema": answer}}}, **_errors(*errors)},
        }
        if body is not None:
            operation["requestBody"] = {"required": True,
                                        "content": {"application/json": {"schema": body}}}
        return {"post": operation}

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sse-broker edge", "version": "1",
            "description": "Streams LLM answers to many viewers over Server-Sent Events.",
        },
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "a producer API key (BROKER_API_KEYS)"},
                "viewerToken": {"type": "apiKey", "in": "query", "name": "token",
                                "description": "the token in the create answer's events_url"},
            },
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error"],
                    "properties": {"error": {
                        "type": "object", "required": ["code", "message"],
                        "properties": {"code": {"type": "string"},
                                       "message": {"type": "string"}},
                    }},
                },
                "Generation": generation,
            },
        },
        "paths": {
            "/v1/generations": {"post": {
                "summary": "create a generation",
                "security": [{"apiKey": []}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"anyOf": [create_body, external_create]}}}},
                "responses": {
                    "201": {"description": "queued (an external producer's: running)",
                            "content": {"application/json": {
                        "schema": {"type": "object",
                                   "required": ["id", "events_url", "status"],
                                   "properties": {"id": {"type": "string"},
                                                  "events_url": {"type": "string"},
                                                  "status": {"enum": ["queued", "running"]},
                                                  "conversation_id": {"type": "string"},
                                                  "conversation_url": {"type": "string"},
                                                  "append_url": {"type": "string"},
                                                  "finish_url": {"type": "string"},
                                                  "heartbeat_url": {"type": "string"},
                                                  "lease_seconds": {"type": "number"}}}}}},
                    **_errors(400, 401, 408, 413, 422, 429, 503),
                },
            }},
            "/v1/generations/{gen_id}": {"get": {
                "summary": "status, text, reasoning and tool calls so far",
                "security": [{"apiKey": []}],
                "parameters": [_GEN_ID],
                "responses": {
                    "200": {"description": "the generation", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Generation"}}
                    }},
                    **_errors(401, 404, 503),
                },
            }},
            "/v1/generations/{gen_id}/cancel": {"post": {
                "summary": "cancel a generation",
                "security": [{"apiKey": []}],
                "parameters": [_GEN_ID],
                "responses": {
                    "202": {"description": "cancelling", "content": {"application/json": {
                        "schema": {"type": "object", "required": ["id", "status"],
                                   "properties": {"id": {"type": "string"},
                                                  "status": {"const": "cancelling"}}}}}},
                    **_errors(401, 404, 409, 503),
                },
            }},
            "/v1/generations/{gen_id}/append": producer_endpoint(
                "append events to an external producer's generation (idempotent by 'after')",
                append_body, count, 400, 401, 403, 404, 408, 409, 413, 422, 503),
            "/v1/generations/{gen_id}/finish": producer_endpoint(
                "end an external producer's generation (idempotent)", finish_body,
                {"type": "object", "required": ["id", "status", "finish_reason", "count"]},
                400, 401, 403, 404, 408, 409, 413, 422, 503),
            "/v1/generations/{gen_id}/heartbeat": producer_endpoint(
                "renew an external producer's lease", None,
                {"type": "object", "required": ["status", "count"]},
                401, 403, 404, 409, 503),
            "/v1/generations/{gen_id}/events": {"get": {
                "summary": "the stream (Server-Sent Events); resumes after Last-Event-ID",
                "security": [{"viewerToken": []}],
                "parameters": [
                    _GEN_ID,
                    {"name": "Last-Event-ID", "in": "header", "required": False,
                     "schema": {"type": "string"}},
                    {"name": "last_event_id", "in": "query", "required": False,
                     "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "the event stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    "204": {"description": "nothing after Last-Event-ID: the stream ended"},
                    **_errors(400, 401, 403, 404, 410, 503),
                },
            }},
            "/v1/conversations/{cid}": {"get": {
                "summary": "a conversation's turns and its active turn",
                "security": [{"apiKey": []}],
                "parameters": [_CID],
                "responses": {
                    "200": {"description": "the conversation", "content": {
                        "application/json": {"schema": conversation}}},
                    **_errors(401, 404, 503),
                },
            }},
            "/v1/conversations/{cid}/events": {"get": {
                "summary": "every turn of a conversation over one stream (Server-Sent Events); "
                           "stays open between turns, resumes after Last-Event-ID",
                "security": [{"viewerToken": []}],
                "parameters": [
                    _CID,
                    {"name": "Last-Event-ID", "in": "header", "required": False,
                     "schema": {"type": "string"}},
                    {"name": "last_event_id", "in": "query", "required": False,
                     "schema": {"type": "string"}},
                    {"name": "from", "in": "query", "required": False,
                     "schema": {"enum": ["all", "active"]},
                     "description": "where a new device starts: every turn (all) or the "
                                    "active one"},
                ],
                "responses": {
                    "200": {"description": "the event stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    **_errors(400, 401, 403, 404, 503),
                },
            }},
            **_ai_sdk_paths(),
            "/healthz": {"get": {"summary": "the process is up", "responses": {
                "200": {"description": "up"}}}},
            "/readyz": {"get": {"summary": "Redis reachable and delivering", "responses": {
                "200": {"description": "ready"}, **_errors(503)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
    }


def _ai_sdk_paths() -> dict[str, Any]:
    """The AI SDK's chat endpoints (``broker.edge.aisdk_routes``). The body's schema holds
    only what the edge checks (a body it would refuse must break the schema: the fuzzer's
    negative cases count on it); the parts of a message are the SDK's ``UIMessage`` parts."""
    ui_message = {
        "type": "object", "required": ["role", "parts"],
        "properties": {"id": {}, "role": {"enum": ["system", "user", "assistant"]},
                       "parts": {"type": "array", "items": {"type": "object"}}},
    }
    chat_body = {
        "type": "object", "required": ["id", "messages"],
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$",
                   "description": "the chat id: the conversation the turn belongs to"},
            "messages": {"type": "array", "items": ui_message, "minItems": 1},
            "trigger": {"enum": ["submit-message", "regenerate-message"]},
            "messageId": {},
        },
        "additionalProperties": True,
        "description": "the body DefaultChatTransport posts; other fields (the transport's "
                       "`body` option) go to the LLM request as in POST /v1/generations",
    }
    ui_stream = {"text/event-stream": {"schema": {"type": "string"}}}
    stream_headers = {"x-vercel-ai-ui-message-stream": {"schema": {"const": "v1"}}}
    return {
        "/v1/ai-sdk/chat": {"post": {
            "summary": "run a turn of the chat; its UI message stream (AI SDK)",
            "security": [{"apiKey": []}],
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": chat_body}}},
            "responses": {
                "200": {"description": "the turn's UI message stream",
                        "headers": stream_headers, "content": ui_stream},
                **_errors(400, 401, 408, 413, 422, 429, 503),
            },
        }},
        "/v1/ai-sdk/chat/{chat_id}/stream": {"get": {
            "summary": "the chat's active turn's UI message stream, from its start (AI SDK)",
            "security": [{"apiKey": []}, {"viewerToken": []}],
            "parameters": [{"name": "chat_id", "in": "path", "required": True,
                            "schema": {"type": "string"}, "description": "the chat id"}],
            "responses": {
                "200": {"description": "the active turn's UI message stream",
                        "headers": stream_headers, "content": ui_stream},
                "204": {"description": "the chat has no active turn"},
                **_errors(401, 403, 404, 503),
            },
        }},
    }
