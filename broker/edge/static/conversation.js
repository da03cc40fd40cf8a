/* The conversation view of the demo (a file of its own: the page's Content-Security-Policy
 * allows no inline script). Each question is the next turn of one conversation; two devices
 * follow it with the edge's helper module, each over one stream. This page only renders what
 * the helper reports. */
import { followConversation } from '/static/broker-conversation.js';
import {
  buildTypedParts, showData, showReasoning, showToolCall, showToolResult,
} from '/static/demo-typed.js';

const DEVICES = ['Device A', 'Device B'];

/* For tests (and the curious): plain data, serialisable out of the page. */
const demo = {
  conversationId: 'demo-' + Math.random().toString(36).slice(2, 10),
  generations: [],  // the turns this page created, in order
  devices: [],      // each device's follow.snapshot(), kept current
};
window.conversationDemo = demo;

const $ = (selector) => document.querySelector(selector);
const history = [];    // the chat so far, sent with each new turn: [{role, content}, ...]
const questions = new Map();  // generation id -> its question
// { index, follow, els, blocks: Map(generation id -> element), parts: Map(generation id ->
// the turn's reasoning pane, tool chips and answer) }
const devices = [];

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setNotice(text, bad) {
  $('#notice').textContent = text;
  $('#notice').classList.toggle('bad', Boolean(bad));
}

function sync(device) {
  demo.devices[device.index] = device.follow.snapshot();
  const { state, reconnects, lastEventId } = device.follow;
  device.els.root.dataset.state = state;
  device.els.state.textContent = state;
  device.els.reconnects.textContent = String(reconnects);
  device.els.lastId.textContent = lastEventId || '–';
}

function buildDevice(index) {
  const root = el('article', 'viewer device card');
  root.dataset.deviceIndex = String(index);
  const head = el('header');
  const state = el('span', 'state', 'connecting');
  const reconnects = el('span', 'count-reconnects', '0');
  const lastId = el('span', 'last-id mono', '–');
  const meta = el('span', 'meta');
  meta.append('reconnects ', reconnects, ' · last id ', lastId);
  const drop = el('button', 'drop', 'Drop connection');
  drop.type = 'button';
  drop.title = 'Close this EventSource and open a new one that resumes after the last id';
  head.append(el('h2', null, DEVICES[index]), state, meta, el('span', 'spacer'), drop);
  const turns = el('div', 'turns');
  root.append(head, turns);
  return { root, state, reconnects, lastId, drop, turns };
}

function openDevice(index, url) {
  const device = { index, follow: null, els: buildDevice(index), blocks: new Map(),
                   parts: new Map() };
  devices.push(device);
  $('#devices').append(device.els.root);
  device.els.drop.addEventListener('click', () => {
    device.follow.reconnect();
    sync(device);
  });
  device.follow = followConversation(url, {
    onTurn: (turn) => {
      const block = el('section', 'turn');
      block.dataset.generationId = turn.generationId;
      const parts = buildTypedParts();  // the reasoning pane, the tool chips, the answer
      block.append(el('h3', null, 'Turn ' + turn.turn),
                   el('p', 'question', questions.get(turn.generationId) || ''),
                   ...parts.nodes);
      device.blocks.set(turn.generationId, block);
      device.parts.set(turn.generationId, parts);
      device.els.turns.append(block);
      sync(device);
    },
    onText: (turn, text) => {
      const answer = device.blocks.get(turn.generationId).querySelector('.answer');
      answer.append(el('span', 'msg ' + (turn.events % 2 ? 'odd' : 'even'), text));
      sync(device);
    },
    // The typed events beside the answer, shown as on the demo page's viewers.
    onEvent: (turn, name, data) => {
      const parts = device.parts.get(turn.generationId);
      const eventId = device.follow.lastEventId;
      if (name === 'reasoning') showReasoning(parts, data.text);
      else if (name === 'tool_call') showToolCall(parts, data, eventId);
      else if (name === 'tool_result') showToolResult(parts, data, eventId);
      else if (name === 'data') showData(parts, data, eventId);
    },
    onTurnEnd: (turn) => {
      const block = device.blocks.get(turn.generationId);
      block.dataset.state = turn.error ? 'error' : 'ended';
      block.append(el('div', 'meta', turn.error
        ? 'failed: ' + turn.error.code : 'ended: ' + turn.finishReason));
      if (index === 0) history.push({ role: 'assistant', content: turn.text });
      sync(device);
    },
    onState: () => sync(device),
  });
  sync(device);
}

async function ask(event) {
  event.preventDefault();
  const question = $('#question').value.trim();
  if (!question) return;
  $('#ask').disabled = true;
  try {
    const messages = [...history, { role: 'user', content: question }];
    const response = await fetch('/v1/generations', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ messages, conversation_id: demo.conversationId }),
    });
    let body = null;
    try { body = await response.json(); } catch (_) { /* a proxy's page */ }
    if (response.status !== 201) {
      const error = body && body.error;
      setNotice(error ? error.code + ': ' + error.message : 'HTTP ' + response.status, true);
      return;
    }
    history.push({ role: 'user', content: question });
    questions.set(body.id, question);
    demo.generations.push(body.id);
    setNotice('Turn ' + demo.generations.length + ' queued.');
    // The devices open with the first turn (its answer carries the conversation's token)
    // and stay open for every later one.
    if (devices.length === 0) {
      DEVICES.forEach((_, index) => openDevice(index, body.conversation_url));
    }
  } catch (e) {
    setNotice('request failed: ' + e.message, true);
  } finally {
    $('#ask').disabled = false;
  }
}

$('#conversation-id').textContent = demo.conversationId;
$('#ask-form').addEventListener('submit', ask);
