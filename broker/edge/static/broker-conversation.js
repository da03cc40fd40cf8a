/**
 * broker-conversation.js: follow every turn of a conversation from a browser.
 *
 * An ES module with no dependencies and no build step, served by every edge at
 * `/static/broker-conversation.js` (the conversation counterpart of broker-stream.js). One
 * `EventSource` on `GET /v1/conversations/<cid>/events` receives every turn, in order, and
 * stays open between turns: a turn's `end`/`error` ends that turn, not the stream. The
 * browser resumes a dropped connection by itself with `Last-Event-ID`; `reconnect()` does it
 * by hand (`?last_event_id=`), on any edge, with nothing lost or repeated.
 *
 * Usage:
 *
 *   import { followConversation } from '/static/broker-conversation.js';
 *   // conversation_url: from the create answer of any turn (POST /v1/generations with
 *   // "conversation_id"), or GET /v1/conversations/<cid> (events_url).
 *   const follow = followConversation(conversationUrl, {
 *     onTurn: (turn) => render(turn),                 // a turn starts: { generationId, turn, status }
 *     onText: (turn, text) => append(turn, text),     // each message of the turn's answer
 *     onTurnEnd: (turn) => done(turn),                // its `end` (finishReason) or `error`
 *   });
 *
 * followConversation(url, options) -> handle
 *   url                  the conversation's events URL, verbatim (its token included).
 *   options.lastEventId  resume after this id on the first connection (an id inside a turn:
 *                        that turn starts at the next event, onTurn with status 'running').
 *   options.withCredentials  passed to EventSource (the cookie `broker_conversation_token_<cid>`).
 *   options.onTurn(turn, handle), options.onText(turn, text, handle),
 *   options.onEvent(turn, name, data, handle)   every event of a turn (typed events too),
 *   options.onTurnEnd(turn, handle), options.onState(state, handle).
 *
 * The handle: turns (in order: { generationId, turn, status, text, reasoning, events,
 * finishReason, error, ended }), ids (every id received), lastEventId, state ('connecting' |
 * 'live' | 'reconnecting' | 'refused' | 'closed'), reconnects, reconnect(), close(),
 * snapshot() (plain data, for logs and tests). A stream the server refuses (401, 403, ...)
 * leaves EventSource CLOSED: the state is then 'refused' (no retry; fetch the URL to see
 * why). Leaving the page (`pagehide`) closes the connection; coming back from the
 * back/forward cache (`pageshow`) resumes after `lastEventId`.
 */

import { resumeUrl } from '/static/broker-stream.js';

const TYPED_EVENTS = ['reasoning', 'tool_call', 'tool_result', 'data'];

export function followConversation(url, options = {}) {
  const byGeneration = new Map();
  const handle = {
    turns: [],
    ids: [],
    lastEventId: options.lastEventId || '',
    state: 'connecting',
    reconnects: 0,
    source: null,
    reconnect,
    close,
    snapshot,
  };

  function call(callback, ...args) {
    if (typeof callback === 'function') callback(...args, handle);
  }

  function setState(state) {
    if (handle.state === state) return;
    handle.state = state;
    call(options.onState, state);
  }

  /** The event's data, and its turn (null if the data or the turn is unknown; a turn's own
   * event, `isTurn`, never makes one here). */
  function read(e, isTurn = false) {
    let data = null;
    try {
      data = JSON.parse(e.data);
    } catch (_) {
      return [null, null];
    }
    if (e.lastEventId) {
      handle.lastEventId = e.lastEventId;
      handle.ids.push(e.lastEventId);
    }
    let turn = byGeneration.get(data.generation_id) || null;
    if (!turn && !isTurn && data.generation_id && e.lastEventId) {
      // Resumed inside a turn (options.lastEventId kept by the page): its `turn` event came
      // before that id. The turn starts here, its number from the id (the turn's digits
      // before the event's ten).
      turn = addTurn(data.generation_id, parseInt(e.lastEventId.slice(0, -10), 10), 'running');
    }
    return [data, turn];
  }

  function addTurn(generationId, number, status) {
    const turn = {
      generationId, turn: number, status, text: '', reasoning: '', events: 0,
      finishReason: null, error: null, ended: false,
    };
    handle.turns.push(turn);
    byGeneration.set(turn.generationId, turn);
    call(options.onTurn, turn);
    return turn;
  }

  function onTurn(e) {
    const [data] = read(e, true);
    if (!data || byGeneration.has(data.generation_id)) return;
    addTurn(data.generation_id, data.turn, data.status);
  }

  function onEvent(name, e) {
    const [data, turn] = read(e);
    if (!turn) return;
    turn.events += 1;
    if (name === 'message') turn.text += data.text;
    if (name === 'reasoning') turn.reasoning += data.text;
    call(options.onEvent, turn, name, data);
    if (name === 'message') call(options.onText, turn, data.text);
    if (name === 'end' || name === 'error') {
      turn.ended = true;
      turn.status = name === 'end' ? 'completed' : 'failed';
      if (name === 'end') turn.finishReason = data.finish_reason;
      else turn.error = { code: data.code, message: data.message };
      call(options.onTurnEnd, turn);
    }
  }

  function open() {
    const target = handle.lastEventId ? resumeUrl(url, handle.lastEventId) : url;
    const source = new EventSource(target, { withCredentials: Boolean(options.withCredentials) });
    handle.source = source;
    source.onopen = () => setState('live');
    source.addEventListener('turn', onTurn);
    source.onmessage = (e) => onEvent('message', e);
    for (const name of [...TYPED_EVENTS, 'end']) {
      source.addEventListener(name, (e) => onEvent(name, e));
    }
    // Two things share this name: the server's `event: error` (a turn failed: it has data)
    // and the connection's own error (none).
    source.addEventListener('error', (e) => {
      if (typeof e.data === 'string') {
        onEvent('error', e);
        return;
      }
      if (source !== handle.source) return;
      if (source.readyState === EventSource.CLOSED) {
        setState('refused');
      } else {
        handle.reconnects += 1;  // the browser reconnects with Last-Event-ID by itself
        setState('reconnecting');
      }
    });
  }

  function stop() {
    if (handle.source) handle.source.close();
  }

  /** Close the connection and open a new one after `lastEventId` (a dropped device). */
  function reconnect() {
    stop();
    handle.reconnects += 1;
    setState('reconnecting');
    open();
  }

  function close() {
    stop();
    setState('closed');
  }

  function snapshot() {
    return {
      turns: handle.turns.map((t) => ({ ...t })), ids: [...handle.ids],
      lastEventId: handle.lastEventId, state: handle.state, reconnects: handle.reconnects,
    };
  }

  addEventListener('pagehide', () => {
    if (handle.state === 'closed') return;
    stop();
    setState('paused');
  });
  addEventListener('pageshow', (e) => {
    if (e.persisted && handle.state === 'paused') reconnect();
  });

  open();
  return handle;
}
