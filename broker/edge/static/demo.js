/* The demo page's script (a file of its own: the page's Content-Security-Policy allows no
 * inline script). */
/* The viewers follow the stream through the edge's own helper module, the same one any
 * page can import: it wraps EventSource, assembles the text, handles `end`, `event: error`,
 * refused streams (404, 410) and resumes. This page only renders what it reports: the
 * answer, the model's reasoning in a pane that folds away, and each tool call, tool result
 * and data event as a chip. */
import { followGeneration } from '/static/broker-stream.js';
import {
  buildTypedParts, el, showData, showReasoning, showToolCall, showToolResult,
} from '/static/demo-typed.js';

/* Everything a test (or a curious person in the console) may want to read. Each viewer
 * object is plain data; the stream handle and DOM nodes live in a private record instead, so
 * `window.demo.viewers` serialises cleanly out of the page. */
const demo = { generation: null, viewers: [] };
window.demo = demo;

// Private per-viewer records, parallel to demo.viewers: { data, follow, els }.
const panels = [];

const LOG_LIMIT = 500; // keep long answers from growing the event log without bound

const $ = (selector) => document.querySelector(selector);

/* ---------- small helpers ---------- */

/** The API path of the current generation, plus an optional suffix. */
function generationUrl(suffix) {
  return '/v1/generations/' + encodeURIComponent(demo.generation.id) + (suffix || '');
}

/** Parse a JSON body without throwing: error answers may come from a proxy, not the broker. */
async function readJson(response) {
  try {
    return await response.json();
  } catch (_) {
    return null;
  }
}

/** The contract's error body is {"error": {"code", "message"}}; fall back to the HTTP status. */
function errorText(response, body) {
  const err = body && body.error;
  if (err && (err.message || err.code)) {
    return (err.code ? err.code + ': ' : '') + (err.message || '');
  }
  return 'HTTP ' + response.status + (response.statusText ? ' ' + response.statusText : '');
}

function setNotice(text, bad) {
  const el = $('#notice');
  el.textContent = text;
  el.classList.toggle('bad', Boolean(bad));
}

/* ---------- viewer panels ---------- */

/** Build the DOM of one viewer panel and return the nodes the code updates. */
function buildPanel(index) {
  const root = el('article', 'viewer card');
  root.dataset.viewerIndex = String(index);

  const head = el('header');
  head.append(el('h2', null, 'Viewer #' + (index + 1)));
  const state = el('span', 'state', 'connecting');
  head.append(state);

  const meta = el('span', 'meta');
  const messages = el('span', 'count-messages', '0');
  const reconnects = el('span', 'count-reconnects', '0');
  const lastId = el('span', 'last-id mono', '–');
  meta.append('messages ', messages, ' · reconnects ', reconnects, ' · last id ', lastId);
  head.append(meta, el('span', 'spacer'));

  const drop = el('button', 'drop', 'Drop connection');
  drop.type = 'button';
  drop.title = 'Close this EventSource and open a new one that resumes after the last id seen';
  head.append(drop);

  const parts = buildTypedParts();  // reasoning pane, tool chips, answer
  const log = el('ol', 'log');

  root.append(head, ...parts.nodes, log);
  return { root, state, messages, reconnects, lastId, drop, parts, answer: parts.answer, log };
}

/** Create viewer number `index` and connect it from the beginning (late join). */
function addViewer() {
  const index = demo.viewers.length;
  const data = {
    index,
    text: '',
    ids: [],          // ids of every event received (messages and the terminal one), in order
    lastEventId: '',
    messages: 0,
    reconnects: 0,
    state: 'connecting',
    finishReason: null,
    errorCode: null,
    terminal: null,   // 'end' | 'error' once the terminal event has been seen
    reasoning: '',    // the reasoning received, joined
    toolCalls: [],    // each tool_call event's data: { index, id, name, arguments }
    toolResults: [],  // each tool_result event's data: { id, result }
    data: [],         // each data event's data: { name, value }
  };
  const panel = { data, follow: null, els: buildPanel(index) };
  demo.viewers.push(data);
  panels.push(panel);

  panel.els.drop.addEventListener('click', () => dropConnection(panel));
  $('#viewers').append(panel.els.root);
  panel.follow = followGeneration(demo.generation.events_url, {
    onMessage: (message) => onAnswerMessage(panel, message),
    onReasoning: (event) => onReasoning(panel, event),
    onToolCall: (event) => onToolCall(panel, event),
    onToolResult: (event) => onToolResult(panel, event),
    onData: (event) => onDataEvent(panel, event),
    onEnd: (result) => onEnd(panel, result),
    onError: (error) => onViewerError(panel, error),
    onState: (state, info) => onViewerState(panel, state, info),
  });
  return panel;
}

/** What a state reads as. An ended answer says how it ended in words: "stop" is the
 * finish_reason of a complete answer, and must not read like a viewer that stopped, nor like
 * a cancelled answer. */
function stateLabel(panel, state, detail) {
  if (state === 'ended') {
    if (detail === 'stop') return 'complete';
    if (detail === 'cancelled') return 'cancelled';
    return 'ended: ' + detail;  // 'length', or whatever else the LLM said
  }
  if (state === 'error') {
    // The stream's own `event: error` (the generation failed) vs a stream the server refused.
    return (panel.data.terminal === 'error' ? 'failed: ' : 'refused: ') + detail;
  }
  return detail ? state + ': ' + detail : state;
}

/** Show state as text, as the data-state attribute, and in the viewer's public record. */
function setState(panel, state, detail) {
  const { data, els } = panel;
  data.state = state;
  els.root.dataset.state = state;
  els.state.textContent = stateLabel(panel, state, detail);
  if (state === 'ended' && data.finishReason) {
    els.root.dataset.finishReason = data.finishReason;
  } else {
    delete els.root.dataset.finishReason;
  }
}

/** Copy what the stream handle knows into the viewer's public record. */
function sync(panel) {
  const { data, follow } = panel;
  data.text = follow.text;
  data.ids = follow.ids;
  data.lastEventId = follow.lastEventId;
  data.reconnects = follow.reconnects;
}

function updateCounters(panel) {
  const { data, els } = panel;
  els.messages.textContent = String(data.messages);
  els.reconnects.textContent = String(data.reconnects);
  els.lastId.textContent = data.lastEventId || '–';
}

function logLine(panel, text, bad) {
  const log = panel.els.log;
  const item = el('li', bad ? 'bad' : null, text);
  log.append(item);
  while (log.childElementCount > LOG_LIMIT) log.firstElementChild.remove();
  log.scrollTop = log.scrollHeight;
}

function onAnswerMessage(panel, message) {
  const { data, els } = panel;
  sync(panel);
  if (message.data === null) {
    // A bad payload is logged, not rendered; its id still counts for the resume point.
    updateCounters(panel);
    logLine(panel, (message.id || '?') + ' unparseable data: ' +
      String(message.raw).slice(0, 80), true);
    return;
  }
  data.messages += 1;
  generationRunning();

  // One span per message, tinted alternately, so the sentence-sized chunks are visible.
  const span = el('span', 'msg ' + (data.messages % 2 ? 'odd' : 'even'), message.text);
  span.dataset.id = message.id;
  els.answer.append(span);

  updateCounters(panel);
  logLine(panel, message.id + ' message (' + message.text.length + ' chars)');
}

/* ---------- typed events: reasoning, tool calls, tool results, data ---------- */

/** An event whose data could not be parsed: logged, not rendered; its id still counts. */
function unparseable(panel, event, kind) {
  if (event.data !== null) return false;
  sync(panel);
  updateCounters(panel);
  logLine(panel, (event.id || '?') + ' ' + kind + ' with unparseable data: ' +
    String(event.raw).slice(0, 80), true);
  return true;
}

function onReasoning(panel, event) {
  if (unparseable(panel, event, 'reasoning')) return;
  const { data, els } = panel;
  sync(panel);
  generationRunning();
  data.reasoning += event.text;
  showReasoning(els.parts, event.text);
  updateCounters(panel);
  logLine(panel, event.id + ' reasoning (' + event.text.length + ' chars)');
}

function onToolCall(panel, event) {
  if (unparseable(panel, event, 'tool_call')) return;
  const call = event.data;
  sync(panel);
  generationRunning();
  panel.data.toolCalls.push(call);
  showToolCall(panel.els.parts, call, event.id);
  updateCounters(panel);
  logLine(panel, event.id + ' tool_call ' + call.name + ' (' + call.id + ')');
}

function onToolResult(panel, event) {
  if (unparseable(panel, event, 'tool_result')) return;
  sync(panel);
  panel.data.toolResults.push(event.data);
  showToolResult(panel.els.parts, event.data, event.id);
  updateCounters(panel);
  logLine(panel, event.id + ' tool_result for ' + event.data.id);
}

function onDataEvent(panel, event) {
  if (unparseable(panel, event, 'data')) return;
  sync(panel);
  panel.data.data.push(event.data);
  showData(panel.els.parts, event.data, event.id);
  updateCounters(panel);
  logLine(panel, event.id + ' data ' + event.data.name);
}

function onEnd(panel, result) {
  const { data, els } = panel;
  sync(panel);
  data.terminal = 'end';
  data.finishReason = result.finishReason;
  updateCounters(panel);
  setState(panel, 'ended', data.finishReason);
  els.drop.disabled = true;  // nothing to resume: the stream is over
  const usage = result.usage ? ' usage ' + JSON.stringify(result.usage) : '';
  logLine(panel, result.lastEventId + ' end: ' + data.finishReason + usage);
  generationEnded({ finishReason: result.finishReason });
}

/** The stream's `event: error`, or a stream the server refused (the helper found out why). */
function onViewerError(panel, error) {
  const { data } = panel;
  sync(panel);
  data.errorCode = error.code;
  if (error.terminal) data.terminal = 'error';
  updateCounters(panel);
  setState(panel, 'error', error.code);
  if (error.terminal) {
    panel.els.drop.disabled = true;
    logLine(panel, data.lastEventId + ' error: ' + error.code +
      (error.message && error.message !== error.code ? ' (' + error.message + ')' : ''), true);
    generationEnded({ errorCode: error.code });
  } else {
    logLine(panel, 'stream closed by the server without a terminal event (' + error.code +
      (error.status ? ', HTTP ' + error.status : '') + ')', true);
    fetchStatus();
  }
}

/** Connection states the helper reports; the terminal ones come with onEnd / onError. */
function onViewerState(panel, state, info) {
  const { data } = panel;
  if (state === 'live') {
    setState(panel, 'live');
  } else if (state === 'reconnecting') {
    sync(panel);
    updateCounters(panel);
    setState(panel, 'reconnecting');
    const after = data.lastEventId || 'the start';
    const why = { reconnect: 'dropped; resuming after ',
                  pageshow: 'page shown again; resuming after ' }[info.reason];
    logLine(panel, (why || 'connection lost; browser reconnects after ') + after);
  } else if (state === 'paused') {
    setState(panel, 'paused');  // the page was hidden away (pagehide): no connection
  } else if (info.reason === 'already_over') {
    // A resume after the terminal event: the server answers 204, nothing was missed.
    restoreTerminalState(panel);
    logLine(panel, 'server says the stream is over (204); nothing missed');
  }
}

/** Put back the state the terminal event set, after a resume that found nothing new. */
function restoreTerminalState(panel) {
  const { data } = panel;
  if (data.terminal === 'error') setState(panel, 'error', data.errorCode);
  else setState(panel, 'ended', data.finishReason);
}

/** Close a panel's connection and resume on a fresh one after the last id seen (or from
 * the start, which equals a late join, if it has none yet). */
function dropConnection(panel) {
  panel.follow.reconnect();
}

/** Close and remove every viewer (a new question starts a new generation). */
function clearViewers() {
  const old = panels.splice(0);
  demo.viewers.length = 0; // in place, so references held by tests stay valid
  for (const panel of old) panel.follow.close();
  $('#viewers').replaceChildren();
}

/* ---------- generation-level actions ---------- */

function setGenerationControls(enabled) {
  for (const id of ['#add-viewer', '#cancel', '#status']) $(id).disabled = !enabled;
}

async function ask(event) {
  event.preventDefault();
  const q = $('#question').value;
  const model = $('#model').value.trim();
  const askButton = $('#ask');
  askButton.disabled = true;
  setNotice('Asking…');
  try {
    const response = await fetch('/v1/generations', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ messages: [{ role: 'user', content: q }], ...(model ? { model } : {}) }),
    });
    const body = await readJson(response);
    if (!response.ok) {
      setNotice('Ask failed: ' + errorText(response, body), true);
      return;
    }
    if (!body || !body.id || !body.events_url) {
      setNotice('Ask failed: unexpected answer from the server', true);
      return;
    }
    startGeneration(body);
  } catch (err) {
    setNotice('Ask failed: ' + err.message, true);
  } finally {
    askButton.disabled = false;
  }
}

function startGeneration(body) {
  clearViewers();
  // status: what the page last knew for sure; ended: a viewer saw the terminal event.
  demo.generation = { id: body.id, events_url: body.events_url, status: body.status,
                      ended: false };
  $('#gen-id').textContent = body.id;
  $('#status-line').textContent = body.status || 'queued';
  setNotice('Generation created: viewer #1 follows its stream below.');
  setGenerationControls(true);
  addViewer();
}

/** A viewer received a message: a worker is running the generation. */
function generationRunning() {
  const gen = demo.generation;
  if (gen.ended || gen.status !== 'queued') return;
  gen.status = 'running';
  $('#status-line').textContent = 'running';
}

/** The first viewer to see the terminal event ends the generation for the page: what only
 * made sense while it ran (Cancel, the texts about it) changes now, once. */
function generationEnded(outcome) {
  const gen = demo.generation;
  if (gen.ended) return;
  gen.ended = true;
  $('#cancel').disabled = true;  // a cancel could only answer 409 now
  if (outcome.errorCode) {
    setNotice('The generation failed (' + outcome.errorCode + ').', true);
  } else if (outcome.finishReason === 'cancelled') {
    setNotice('Cancelled: the answer stopped early; every viewer has the same text up to there.');
  } else {
    setNotice('The answer is complete (finish_reason ' + outcome.finishReason + ').');
  }
  fetchStatus();  // the server's final word: status, length, finish_reason
}

async function cancelGeneration() {
  const gen = demo.generation;
  if (!gen || gen.ended) return;
  setNotice('Cancelling…');
  try {
    const response = await fetch(generationUrl('/cancel'), { method: 'POST' });
    if (gen !== demo.generation || gen.ended) return;  // the stream told the outcome already
    if (response.status === 202) {
      setNotice('Cancel accepted (202): the stream ends with finish_reason "cancelled".');
    } else if (response.status === 409) {
      setNotice('Not cancelled (409): the generation had already finished.');
    } else {
      setNotice('Cancel failed: ' + errorText(response, await readJson(response)), true);
    }
  } catch (err) {
    setNotice('Cancel failed: ' + err.message, true);
  }
}

const TERMINAL_STATUSES = ['completed', 'failed', 'cancelled'];

/** Ask the server for the generation's status. An answer that comes back after the page
 * moved on (another generation, or the end seen meanwhile) is dropped, not shown stale. */
async function fetchStatus() {
  const gen = demo.generation;
  if (!gen) return;
  const line = $('#status-line');
  try {
    const response = await fetch(generationUrl());
    const body = await readJson(response);
    if (gen !== demo.generation) return;
    if (!response.ok) {
      line.textContent = 'error: ' + errorText(response, body);
      return;
    }
    const final = TERMINAL_STATUSES.includes(body.status);
    if (gen.ended && !final) return;  // asked before the end, answered after it
    gen.status = body.status;
    const length = typeof body.text === 'string' ? body.text.length : 0;
    // The text's length only once it is final: while running it is out of date at once.
    line.textContent = body.status + (final ? ' · text ' + length + ' chars' +
      (body.finish_reason ? ' · finish_reason ' + body.finish_reason : '') : '');
  } catch (err) {
    if (gen === demo.generation) line.textContent = 'error: ' + err.message;
  }
}

$('#ask-form').addEventListener('submit', ask);
$('#add-viewer').addEventListener('click', () => {
  if (demo.generation) addViewer();
});
$('#cancel').addEventListener('click', cancelGeneration);
$('#status').addEventListener('click', fetchStatus);
