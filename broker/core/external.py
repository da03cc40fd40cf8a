"""External producers' generations in Redis: create, append, heartbeat, finish, and the sweep
that ends the ones whose producer fell silent.

Shared by the edge (the producer HTTP API, and its sweep), the worker (its sweep) and the
Python producer's direct transport (``broker.producer``): one set of scripts, so a direct
producer and one over HTTP write the same events the same way. Names and scripts come from
``broker.core.protocol`` (see "external producers" there).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from broker.core import protocol
from broker.core.protocol import LeaseCheck, NewEvent
from broker.core.store import Store

log = logging.getLogger(__name__)

# How many due leases a sweep takes at once (one call, then one per generation, concurrently:
# the client's pool bounds them); it takes more until none is due.
SWEEP_BATCH = 64


@dataclass(frozen=True, slots=True)
class ProducerReply:
    """What a producer script answered: ``outcome`` ('ok', 'duplicate', 'same',
    'offset_mismatch', 'running', a final status, or a refusal: 'gone', 'forbidden',
    'not_external') and ``count``, the producer's events now."""

    outcome: str
    count: int


class ExternalStore:
    """External producers' operations, on a ``Store``'s client and retention settings."""

    def __init__(self, store: Store) -> None:
        self.store = store
        redis = store.redis
        self._create = redis.register_script(protocol.PRODUCER_CREATE_SCRIPT)
        self._append = redis.register_script(protocol.PRODUCER_APPEND_SCRIPT)
        self._heartbeat = redis.register_script(protocol.PRODUCER_HEARTBEAT_SCRIPT)
        self._finish = redis.register_script(protocol.PRODUCER_FINISH_SCRIPT)
        self._schedule = redis.register_script(protocol.PRODUCERS_SCHEDULE_SCRIPT)
        self._due = redis.register_script(protocol.PRODUCERS_DUE_SCRIPT)

    async def create(
        self, gen_id: str, *, model: str, lease: float, producer: str | None = None,
        metadata: dict[str, Any] | None = None, conversation: str | None = None,
    ) -> int | None:
        """A running generation owned by an external producer, its lease ``lease`` seconds,
        and its entry in the sweep's index; the next turn of ``conversation``, if given (its
        turn number is returned). Calls in this order (on a cluster the index and the
        conversation are other slots): the meta first, so neither the index nor the
        conversation ever names a generation before it exists; if a later one fails, the
        meta is taken back and the caller gets the error."""
        create = protocol.ExternalCreate(model=model)
        if producer:
            create["producer"] = producer
        if conversation:
            create["conversation"] = conversation
        if metadata:
            create["metadata"] = json.dumps(metadata, ensure_ascii=False,
                                            separators=(",", ":"))
        args: list[str | int] = [_ms(lease), self.store.ttl_ms]
        for name, value in protocol.external_meta_fields(create).items():
            args += [name, value]
        await self._create(keys=[protocol.meta_key(gen_id)], args=args)
        turn = None
        try:
            await self.schedule_check(gen_id, lease)
            if conversation:
                turn = await self.store.add_turn(conversation, gen_id)
        except BaseException:
            await self.store.redis.delete(protocol.meta_key(gen_id))
            raise
        return turn

    async def append(
        self, gen_id: str, producer: str | None, after: int, events: Sequence[NewEvent],
        published_ms: int | None = None,
    ) -> ProducerReply:
        """Append ``events`` (content kinds, at least one) if ``after`` is the producer's
        count; renews the lease. One atomic call: all or nothing."""
        store = self.store
        args: list[str | int] = [
            producer or "", after, protocol.now_ms() if published_ms is None else published_ms,
            store.maxlen, store.ttl_ms, protocol.live_channel(gen_id), store.publish_cmd,
        ]
        for event in events:
            args += [event.kind, event.data, event.body]
        reply = await self._append(keys=protocol.generation_keys(gen_id), args=args)
        return ProducerReply(*protocol.decode_producer_reply(reply))

    async def heartbeat(self, gen_id: str, producer: str | None) -> ProducerReply:
        reply = await self._heartbeat(keys=[protocol.meta_key(gen_id)], args=[producer or ""])
        return ProducerReply(*protocol.decode_producer_reply(reply))

    async def finish(
        self, gen_id: str, producer: str | None, terminal: NewEvent
    ) -> ProducerReply:
        """End the generation with ``terminal`` (``new_end`` or ``new_error``); a repeat of
        the same terminal event answers 'same'."""
        store = self.store
        reply = await self._finish(
            keys=protocol.generation_keys(gen_id),
            args=[producer or "", protocol.now_ms(), store.maxlen, store.ttl_ms,
                  protocol.live_channel(gen_id), store.publish_cmd, terminal.kind,
                  terminal.data, terminal.final_status, terminal.finish_reason],
        )
        result = ProducerReply(*protocol.decode_producer_reply(reply))
        if result.outcome == "ok":
            await self.store._turn_ended(gen_id)  # (its conversation lives as long as it does)
        if result.outcome in ("ok", "same"):
            await self.forget(gen_id)  # nothing left to sweep (if this fails, a sweep drops it)
        return result

    # -- the sweep's index ---------------------------------------------------------------

    async def schedule_check(self, gen_id: str, delay: float) -> None:
        await self._schedule(keys=[protocol.PRODUCERS_KEY], args=[gen_id, _ms(delay)])

    async def due(self, limit: int, hold: float) -> list[str]:
        reply = await self._due(keys=[protocol.PRODUCERS_KEY], args=[limit, _ms(hold)])
        return [protocol.as_text(gen_id) for gen_id in reply or []]

    async def forget(self, gen_id: str) -> None:
        await self.store.redis.zrem(protocol.PRODUCERS_KEY, gen_id)

    async def sweep(self, check: Callable[[str], Awaitable[LeaseCheck]], hold: float) -> int:
        """One round: check the leases that are due with ``check`` (a ``REAP_SCRIPT`` call,
        reaping a lapsed one), ``SWEEP_BATCH`` at a time and until none is due; re-schedule
        the live ones for when their lease would run out, forget the ended ones. ``hold``:
        how long the taken ones are left to this caller. Returns how many were reaped here.
        Redis errors go to the caller (the entries it took come due again after ``hold``)."""
        reaped = 0
        while True:
            due = await self.due(SWEEP_BATCH, hold)
            outcomes = await asyncio.gather(*(self._check_one(gen_id, check) for gen_id in due),
                                            return_exceptions=True)  # (all done before a raise)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            reaped += sum(1 for outcome in outcomes if outcome is True)
            if len(due) < SWEEP_BATCH:
                return reaped

    async def _check_one(self, gen_id: str, check: Callable[[str], Awaitable[LeaseCheck]]
                         ) -> bool:
        result = await check(gen_id)
        if result.outcome == "running":
            await self.schedule_check(gen_id, result.wait)
            return False
        if result.reaped:
            log.warning("generation %s: its producer stopped appending and heartbeating; "
                        "ended it with producer_lost", gen_id)
        await self.forget(gen_id)
        return result.reaped


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))
