/**
 * broker-stream.js: follow one generation of the broker from a browser.
 *
 * An ES module with no dependencies and no build step, served by every edge at
 * `/static/broker-stream.js`. It wraps `EventSource` with what the stream contract needs:
 * the answer's messages are assembled, the typed events beside them (reasoning, tool calls,
 * tool results, application data) are handed to their own callbacks, `event: end` and
 * `event: error` close the source and
 * settle `done`, a stream the server refuses (404, 410, ...) stops with a reason instead of
 * silently, and `reconnect()` resumes after the last id seen with nothing lost or repeated.
 * Leaving the page closes the connection; a page restored from the back/forward cache
 * resumes after the last id (see PAGE LIFECYCLE).
 *
 * Usage:
 *
 *   import { followGeneration } from '/static/broker-stream.js';
 *   const created = await (await fetch('/v1/generations', { method: 'POST',
 *     headers: { 'Content-Type': 'application/json' },
 *     body: JSON.stringify({ messages: [{ role: 'user', content: 'Hello?' }] }) })).json();
 *   const follow = followGeneration(created.events_url, { onMessage: (m) => out.append(m.text) });
 *   const { text, finishReason, usage } = await follow.done;  // GenerationError on failure
 *
 * followGeneration(eventsUrl, options) -> handle
 *   eventsUrl            the `events_url` the POST answered, used verbatim (see AUTH CHOICES).
 *   options.lastEventId  resume after this id on the first connection (`?last_event_id=`);
 *                        `text` then holds only what follows it.
 *   options.withCredentials  passed to EventSource: send cookies to another origin.
 *   options.onMessage({ id, text, data, raw }, handle)  each message of the answer; `data` is
 *                        the parsed JSON (null if unparseable; the id still counts).
 *   options.onReasoning({ id, text, data, raw }, handle)  each `event: reasoning`: the
 *                        model's reasoning, sentence-sized like the answer (`text` joined
 *                        equals the upstream's reasoning).
 *   options.onToolCall({ id, data, raw }, handle)  each `event: tool_call`, one per complete
 *                        call: `data` is { index, id, name, arguments } (`data.id` is the
 *                        call's id, `id` the event's; `arguments` a string of JSON).
 *   options.onToolResult({ id, data, raw }, handle)  each `event: tool_result`: `data` is
 *                        { id, result } (`data.id` the call it answers; `result` any JSON).
 *   options.onData({ id, data, raw }, handle)  each `event: data`: `data` is { name, value },
 *                        application-defined (sources, progress; `refusal` from the worker).
 *                        For all four, `data` is null if unparseable (the id still counts).
 *                        A page that sets none of them sees what it saw before they existed:
 *                        `text` and `onMessage` carry the answer alone.
 *   options.onEnd({ text, reasoning, toolCalls, finishReason, usage, lastEventId }, handle)
 *                        the `end` event.
 *   options.onError(error, handle)  a GenerationError: the stream's `event: error`
 *                        (`error.terminal === true`) or a stream the server stopped.
 *   options.onState(state, { reason, reconnects }, handle)  every state change, and every
 *                        reconnect attempt (reason 'connection_lost' | 'reconnect' |
 *                        'pageshow').
 *
 * The handle (all read-only but the methods):
 *   text, ids, lastEventId   the answer so far, every id received (typed events' and the
 *                            terminal one's included), the resume point.
 *   reasoning, toolCalls     the reasoning so far (joined), the complete tool calls so far
 *                            (each `event: tool_call`'s data, in order).
 *   state                    'connecting' | 'live' | 'reconnecting' | 'ended' | 'error',
 *                            'closed' after close() before the end, 'paused' while the page
 *                            is hidden away (PAGE LIFECYCLE).
 *   finishReason, usage      from `end`; error: { code, message } once failed.
 *   reconnects               the browser's own reconnects, reconnect() calls and resumes
 *                            on pageshow.
 *   source                   the current EventSource (for inspection only).
 *   done                     Promise: resolves { text, reasoning, toolCalls, finishReason,
 *                            usage, lastEventId } on
 *                            `end`; rejects with a GenerationError (code, message, status,
 *                            terminal) otherwise. It settles once. A rejection nobody awaits
 *                            is not reported as unhandled: callbacks alone are enough.
 *   reconnect() (alias drop())  close the connection and open a new one that resumes after
 *                            `lastEventId` (`?last_event_id=` appended with `?` or `&`).
 *                            After the end this asks again and the server answers 204.
 *   close()                  stop for good; `done` rejects with code 'closed' if still pending.
 *   snapshot()               the fields above as plain data (for logs and tests).
 *
 * How a refused stream is explained: for a non-200 answer (or one that is not
 * text/event-stream) EventSource fires a bare `error` with readyState CLOSED and gives up,
 * and it never exposes the status code. The helper then asks once itself: it repeats the
 * same request with fetch() (the events URL, resuming with `?last_event_id=` as the browser
 * did with its header), reads the status and the JSON error body, and aborts at once if the
 * stream answers 200. The error's code is the body's `error.code`, else by status:
 * 404 'not_found', 410 'history_lost' (the resume point was trimmed from the log), anything
 * else 'connection_closed' (`error.status` holds the status, null if the server could not
 * be reached). The probe carries exactly the events URL's own credentials, so it works for
 * whatever authorises the stream. A 5xx from a proxy also stops EventSource; call
 * reconnect() to try again. While the connection merely drops (server restart, network),
 * EventSource stays CONNECTING and reconnects by itself with `Last-Event-ID`: the state is
 * 'reconnecting' and nothing is lost.
 *
 * PAGE LIFECYCLE: on `pagehide` (the user navigates away, or the page goes into the
 * back/forward cache) a stream that has not ended is closed: the state becomes 'paused'
 * (reason 'pagehide') and `done` stays pending. A browser keeps no connection open for a page
 * nobody sees, and the page stays eligible for the back/forward cache (an open EventSource
 * keeps a page out of it in Chromium). If the page comes back from that cache (`pageshow`),
 * the stream resumes after `lastEventId` (state 'reconnecting', reason 'pageshow', counted in
 * `reconnects`): what was sent meanwhile arrives once, nothing twice. A page that is unloaded
 * instead simply ends with it.
 *
 * AUTH CHOICES: EventSource cannot send an Authorization header (nor any other header), so
 * a viewer cannot present a bearer token the way fetch() can. Two ways remain, and the
 * helper supports both without knowing which one the deployment uses:
 *   - a signed, short-lived token in the events URL (a query parameter). The server puts it
 *     in the `events_url` of the POST answer; the helper uses that URL verbatim, keeps its
 *     query when it appends `last_event_id`, and never logs it or puts it in an error. Treat
 *     the URL as a secret: do not log it, send it to analytics or show it to other users.
 *   - a cookie. Same-origin pages send it anyway; for an edge on another origin pass
 *     `withCredentials: true` (the edge must then answer with
 *     `Access-Control-Allow-Credentials: true` and an explicit allowed origin).
 */

const RESUME_PARAM = 'last_event_id';
const PROBE_TIMEOUT_MS = 10000;
const CODE_BY_STATUS = { 404: 'not_found', 410: 'history_lost' };

/** The failure of a followed generation: `code` and `message` as the server gave them. */
export class GenerationError extends Error {
  constructor(code, message, { status = null, terminal = false, lastEventId = '' } = {}) {
    super(message || code);
    this.name = 'GenerationError';
    this.code = code;
    this.status = status;        // HTTP status of the refused stream, when one was seen
    this.terminal = terminal;    // true: the stream's own `event: error` (the generation failed)
    this.lastEventId = lastEventId;
  }
}

function parameterName(pair) {
  const eq = pair.indexOf('=');
  const raw = (eq === -1 ? pair : pair.slice(0, eq)).replace(/\+/g, ' ');
  try {
    return decodeURIComponent(raw);
  } catch (_) {
    return raw;
  }
}

/**
 * `url` with `last_event_id=<id>` in its query, replacing one already there; the rest of
 * the URL (a token, say) is kept byte for byte. Works for relative and absolute URLs.
 */
export function resumeUrl(url, lastEventId) {
  const hashAt = url.indexOf('#');
  const hash = hashAt === -1 ? '' : url.slice(hashAt);
  const base = hashAt === -1 ? url : url.slice(0, hashAt);
  const queryAt = base.indexOf('?');
  const path = queryAt === -1 ? base : base.slice(0, queryAt);
  const pairs = queryAt === -1 ? [] : base.slice(queryAt + 1).split('&');
  const kept = pairs.filter((pair) => pair && parameterName(pair) !== RESUME_PARAM);
  if (lastEventId) kept.push(RESUME_PARAM + '=' + encodeURIComponent(lastEventId));
  return path + (kept.length ? '?' + kept.join('&') : '') + hash;
}

function parseJson(text) {
  try {
    const value = JSON.parse(text);
    return value !== null && typeof value === 'object' ? value : null;
  } catch (_) {
    return null;
  }
}

async function readJson(response) {
  try {
    return await response.json();
  } catch (_) {
    return null;
  }
}

/** Run a caller's callback; its exception is reported but cannot break the stream's state. */
function callback(fn, ...args) {
  if (typeof fn !== 'function') return;
  try {
    fn(...args);
  } catch (err) {
    setTimeout(() => { throw err; });
  }
}

/** Follow the generation whose stream is at `eventsUrl`; see the top of this file. */
export function followGeneration(eventsUrl, options = {}) {
  if (typeof eventsUrl !== 'string' || eventsUrl === '') {
    throw new TypeError('followGeneration: eventsUrl must be the events_url the server returned');
  }
  const { withCredentials = false, onMessage, onEnd, onError, onState } = options;
  // Each typed event's SSE name, and the option that receives it.
  const typedCallbacks = {
    reasoning: options.onReasoning,
    tool_call: options.onToolCall,
    tool_result: options.onToolResult,
    data: options.onData,
  };

  const view = {
    text: '',
    reasoning: '',
    toolCalls: [],
    ids: [],
    lastEventId: options.lastEventId ? String(options.lastEventId) : '',
    state: 'connecting',
    finishReason: null,
    usage: null,
    error: null,
    reconnects: 0,
  };
  let source = null;
  let attempt = 0;       // which EventSource is current; handlers of older ones do nothing
  let closed = false;    // close() was called
  let terminal = null;   // 'end' | 'error' once the stream's terminal event was seen
  let settled = false;
  let paused = false;    // closed by pagehide; pageshow resumes
  let resolveDone;
  let rejectDone;
  const done = new Promise((resolve, reject) => {
    resolveDone = resolve;
    rejectDone = reject;
  });
  done.catch(() => {});  // callers who only use callbacks get no "unhandled rejection"

  const urlFrom = (id) => (id ? resumeUrl(eventsUrl, id) : eventsUrl);

  function setState(state, reason) {
    view.state = state;
    callback(onState, state, { reason, reconnects: view.reconnects }, handle);
  }

  function noteId(id) {
    if (!id) return;
    view.ids.push(id);
    view.lastEventId = id;
  }

  function settle(value, error) {
    if (settled) return;
    settled = true;
    forgetPage();
    if (error) rejectDone(error);
    else resolveDone(value);
  }

  function fail(code, message, { status = null, isTerminal = false } = {}) {
    const error = new GenerationError(code, message, {
      status, terminal: isTerminal, lastEventId: view.lastEventId,
    });
    view.error = { code, message: error.message };
    setState('error', code);
    callback(onError, error, handle);
    settle(null, error);
  }

  function onMessageEvent(e) {
    const data = parseJson(e.data);
    const text = data && typeof data.text === 'string' ? data.text : '';
    noteId(e.lastEventId);
    view.text += text;
    callback(onMessage, { id: e.lastEventId, text, data, raw: e.data }, handle);
  }

  /** `event: reasoning`, `tool_call`, `tool_result` or `data` (named `kind`). */
  function onTypedEvent(kind, e) {
    const data = parseJson(e.data);
    noteId(e.lastEventId);
    const event = { id: e.lastEventId, data, raw: e.data };
    if (kind === 'reasoning') {
      event.text = data && typeof data.text === 'string' ? data.text : '';
      view.reasoning += event.text;
    } else if (kind === 'tool_call' && data) {
      view.toolCalls.push(data);
    }
    callback(typedCallbacks[kind], event, handle);
  }

  function onEndEvent(e) {
    // Close first: the server closes the response next, and that must not look like a drop.
    source.close();
    const data = parseJson(e.data) || {};
    noteId(e.lastEventId);
    terminal = 'end';
    view.finishReason = typeof data.finish_reason === 'string' ? data.finish_reason : 'unknown';
    view.usage = data.usage === undefined ? null : data.usage;
    const result = {
      text: view.text, reasoning: view.reasoning, toolCalls: view.toolCalls.slice(),
      finishReason: view.finishReason, usage: view.usage, lastEventId: view.lastEventId,
    };
    setState('ended', 'end');
    callback(onEnd, result, handle);
    settle(result, null);
  }

  function onServerError(e) {
    source.close();
    const data = parseJson(e.data) || {};
    noteId(e.lastEventId);
    terminal = 'error';
    const code = typeof data.code === 'string' && data.code ? data.code : 'unknown';
    const message = typeof data.message === 'string' && data.message ? data.message : code;
    fail(code, message, { isTerminal: true });
  }

  function onConnectionError(es, token) {
    if (es.readyState === EventSource.CONNECTING) {
      // The browser reconnects by itself after `retry` ms, sending Last-Event-ID.
      view.reconnects += 1;
      setState('reconnecting', 'connection_lost');
      return;
    }
    // CLOSED: the server answered something other than a 200 event stream; the browser
    // gave up and will not try again.
    es.close();
    if (terminal) {
      // A resume after the terminal event: 204, the stream was over and nothing is missed.
      setState(terminal === 'end' ? 'ended' : 'error', 'already_over');
      return;
    }
    explainRefusal(token);
  }

  /** Repeat the refused request with fetch() to learn its status and error body. */
  async function explainRefusal(token) {
    let code = 'connection_closed';
    let message;
    let status = null;
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), PROBE_TIMEOUT_MS);
    try {
      const response = await fetch(urlFrom(view.lastEventId), {
        credentials: withCredentials ? 'include' : 'same-origin',
        cache: 'no-store',
        signal: controller.signal,
      });
      status = response.status;
      if (status === 200) {
        controller.abort();  // a live stream: do not read it, the point was the status
        const type = response.headers.get('content-type') || '';
        message = type.startsWith('text/event-stream')
          ? 'the stream was refused but answers again now; reconnect() to resume'
          : 'the server answered 200 but not with an event stream (' + type + ')';
      } else if (status === 204) {
        message = 'the server says the stream is over (204), but its terminal event was not seen';
      } else {
        const body = await readJson(response);
        const err = body && typeof body.error === 'object' && body.error ? body.error : {};
        code = (typeof err.code === 'string' && err.code) || CODE_BY_STATUS[status] || code;
        message = (typeof err.message === 'string' && err.message) || 'HTTP ' + status;
      }
    } catch (err) {
      message = 'the stream was closed and the server could not be asked why: ' +
        (err && err.message ? err.message : String(err));
    } finally {
      clearTimeout(timer);
    }
    if (token !== attempt) return;  // reconnect() or close() happened meanwhile
    fail(code, message, { status });
  }

  function open(url) {
    attempt += 1;
    const token = attempt;
    const es = new EventSource(url, { withCredentials: Boolean(withCredentials) });
    source = es;
    const current = () => token === attempt;

    es.onopen = () => {
      if (current()) setState('live', 'open');
    };
    // Messages of the answer carry no `event:` field, so they arrive as plain `message`s.
    es.onmessage = (e) => {
      if (current()) onMessageEvent(e);
    };
    // Typed events carry an `event:` name: a page using `onmessage` alone never sees them.
    // They are listened to whatever the options, since their ids are resume points too.
    for (const kind of Object.keys(typedCallbacks)) {
      es.addEventListener(kind, (e) => {
        if (current()) onTypedEvent(kind, e);
      });
    }
    es.addEventListener('end', (e) => {
      if (current()) onEndEvent(e);
    });
    // One listener for two things: the server's `event: error` (a MessageEvent with string
    // data) and EventSource's own connection error (a plain Event without data).
    es.addEventListener('error', (e) => {
      if (!current()) return;
      if (typeof e.data === 'string') onServerError(e);
      else onConnectionError(es, token);
    });
  }

  function reconnect() {
    if (closed) return false;
    paused = false;
    attempt += 1;  // the old source's late events and a pending explanation are void
    if (source) source.close();
    view.reconnects += 1;
    setState('reconnecting', 'reconnect');
    if (closed) return false;  // onState called close()
    open(urlFrom(view.lastEventId));
    return true;
  }

  function close() {
    if (closed) return;
    closed = true;
    forgetPage();
    attempt += 1;
    if (source) source.close();
    if (!settled) {
      const error = new GenerationError('closed', 'closed by the caller before the end', {
        lastEventId: view.lastEventId,
      });
      settle(null, error);
      setState('closed', 'closed');
    }
  }

  // PAGE LIFECYCLE (top of this file). Only a stream still under way is paused: after its
  // terminal event there is nothing to resume.
  function onPageHide() {
    if (closed || settled || paused) return;
    paused = true;
    attempt += 1;  // the closed source's late events and a pending explanation are void
    if (source) source.close();
    setState('paused', 'pagehide');
  }

  function onPageShow() {
    if (!paused) return;
    paused = false;
    if (closed || settled) return;
    view.reconnects += 1;
    setState('reconnecting', 'pageshow');
    if (closed) return;  // onState called close()
    open(urlFrom(view.lastEventId));
  }

  const page = typeof window !== 'undefined' && typeof window.addEventListener === 'function'
    ? window : null;  // none in a worker
  function forgetPage() {
    if (!page) return;
    page.removeEventListener('pagehide', onPageHide);
    page.removeEventListener('pageshow', onPageShow);
  }
  if (page) {
    page.addEventListener('pagehide', onPageHide);
    page.addEventListener('pageshow', onPageShow);
  }

  function snapshot() {
    return {
      text: view.text,
      reasoning: view.reasoning,
      toolCalls: view.toolCalls.map((call) => ({ ...call })),
      ids: view.ids.slice(),
      lastEventId: view.lastEventId,
      state: view.state,
      finishReason: view.finishReason,
      usage: view.usage,
      error: view.error && { ...view.error },
      reconnects: view.reconnects,
    };
  }

  const handle = {
    get text() { return view.text; },
    get reasoning() { return view.reasoning; },
    get toolCalls() { return view.toolCalls.slice(); },
    get ids() { return view.ids.slice(); },
    get lastEventId() { return view.lastEventId; },
    get state() { return view.state; },
    get finishReason() { return view.finishReason; },
    get usage() { return view.usage; },
    get error() { return view.error && { ...view.error }; },
    get reconnects() { return view.reconnects; },
    get source() { return source; },
    done,
    reconnect,
    drop: reconnect,
    close,
    snapshot,
  };

  open(urlFrom(view.lastEventId));
  return handle;
}
