/* The demo page's conversation view: each question sent here is the next turn of ONE
 * conversation (`conversation_id` on create), and two devices side by side follow every turn,
 * each over one stream that stays open between turns (the helper's followConversation).
 * What a device shows comes from its stream alone: the stream carries no question, so a turn
 * is named by its number and generation. */
import { followConversation } from '/static/broker-stream.js';
import {
  buildTypedParts, el, showData, showReasoning, showToolCall, showToolResult,
} from '/static/demo-typed.js';

const DEVICE_NAMES = ['Device A', 'Device B'];

/* Plain data for tests and the console (window.demo.conversation): the conversation's id
 * and URL, the turns this page created, and what each device received. */
export const conversation = { id: null, url: null, created: [], devices: [] };
const devices = []; // private records, parallel to conversation.devices: { data, follow, els }

const $ = (selector) => document.querySelector(selector);

function newConversationId() {
  const bytes = crypto.getRandomValues(new Uint8Array(6));
  return 'demo-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function setNotice(text, bad) {
  const notice = $('#conversation-notice');
  notice.textContent = text;
  notice.classList.toggle('bad', Boolean(bad));
}

/* ---------- devices ---------- */

function buildDevice(name) {
  const root = el('article', 'device card');
  const head = el('header');
  const state = el('span', 'state', 'connecting');
  const meta = el('span', 'meta');
  const turns = el('span', 'count-turns', '0');
  const reconnects = el('span', 'count-reconnects', '0');
  meta.append('turns ', turns, ' · reconnects ', reconnects);
  const drop = el('button', 'drop', 'Drop connection');
  drop.type = 'button';
  drop.title = 'Close this stream and open a new one that resumes after the last id seen';
  head.append(el('h3', null, name), state, meta, el('span', 'spacer'), drop);
  const list = el('div', 'turns');
  root.append(head, list);
  return { root, state, turns, reconnects, drop, list, byTurn: new Map() };
}

/** The DOM and record of one turn on one device, made when its first event comes. */
function turnOf(device, generationId) {
  let view = device.els.byTurn.get(generationId);
  if (view) return view;
  const record = { generationId, turn: null, status: null, text: '', reasoning: '',
                   toolCalls: [], toolResults: [], data: [], finishReason: null,
                   errorCode: null };
  device.data.turns.push(record);
  const root = el('section', 'turn');
  root.dataset.generationId = generationId;
  const title = el('h4', null, 'Turn');
  const status = el('span', 'turn-status meta', '');
  const head = el('div', 'turn-head');
  head.append(title, status);
  const parts = buildTypedParts();
  root.append(head, ...parts.nodes);
  device.els.list.append(root);
  view = { record, root, title, status, parts };
  device.els.byTurn.set(generationId, view);
  device.els.turns.textContent = String(device.data.turns.length);
  return view;
}

function setTurnStatus(view, status) {
  view.record.status = status;
  view.root.dataset.status = status;
  view.status.textContent = status;
}

function setDeviceState(device, state) {
  device.data.state = state;
  device.els.root.dataset.state = state;
  device.els.state.textContent = state;
}

function note(device, event) {
  const { data, follow } = device;
  data.ids = follow.ids;
  data.lastEventId = follow.lastEventId;
  data.reconnects = follow.reconnects;
  device.els.reconnects.textContent = String(data.reconnects);
  return event.generationId ? turnOf(device, event.generationId) : null;
}

function addDevice(name) {
  const data = { name, state: 'connecting', reconnects: 0, lastEventId: '', ids: [], turns: [] };
  const device = { data, follow: null, els: buildDevice(name) };
  conversation.devices.push(data);
  devices.push(device);
  $('#devices').append(device.els.root);
  device.els.drop.addEventListener('click', () => device.follow.reconnect());
  device.follow = followConversation(conversation.url, {
    onTurn: (e) => {
      const view = note(device, e);
      view.record.turn = e.turn;
      view.title.textContent = 'Turn ' + e.turn;
      view.root.dataset.turn = String(e.turn);
      setTurnStatus(view, e.status);
    },
    onMessage: (e) => {
      const view = note(device, e);
      if (!view) return;
      if (view.record.status !== 'running') setTurnStatus(view, 'running');
      view.record.text += e.text;
      view.parts.answer.append(el('span', 'msg', e.text));
    },
    onReasoning: (e) => {
      const view = note(device, e);
      if (!view) return;
      view.record.reasoning += e.text;
      showReasoning(view.parts, e.text);
    },
    onToolCall: (e) => {
      const view = note(device, e);
      if (!view || !e.data) return;
      view.record.toolCalls.push(e.data);
      showToolCall(view.parts, e.data, e.id);
    },
    onToolResult: (e) => {
      const view = note(device, e);
      if (!view || !e.data) return;
      view.record.toolResults.push(e.data);
      showToolResult(view.parts, e.data, e.id);
    },
    onData: (e) => {
      const view = note(device, e);
      if (!view || !e.data) return;
      view.record.data.push(e.data);
      showData(view.parts, e.data, e.id);
    },
    onTurnEnd: (e) => {
      const view = note(device, e);
      if (!view) return;
      view.record.finishReason = e.finishReason;
      setTurnStatus(view, e.finishReason === 'cancelled' ? 'cancelled'
        : 'complete (' + e.finishReason + ')');
      view.root.dataset.finishReason = e.finishReason;
    },
    onTurnError: (e) => {
      const view = note(device, e);
      if (!view) return;
      view.record.errorCode = e.code;
      setTurnStatus(view, 'failed: ' + e.code);
    },
    onError: (error) => {
      setDeviceState(device, 'refused: ' + error.code);
      device.els.drop.disabled = true;
    },
    onState: (state) => {
      device.data.reconnects = device.follow ? device.follow.reconnects : 0;
      device.els.reconnects.textContent = String(device.data.reconnects);
      if (state !== 'error') setDeviceState(device, state);
    },
  });
}

function closeDevices() {
  for (const device of devices.splice(0)) device.follow.close();
  conversation.devices.length = 0; // in place: references held by tests stay valid
  $('#devices').replaceChildren();
}

/* ---------- turns ---------- */

function startConversation(id) {
  closeDevices();
  conversation.id = id;
  conversation.url = null;
  conversation.created.length = 0;
  $('#conversation-id').value = id;
}

async function sendTurn(event) {
  event.preventDefault();
  const id = $('#conversation-id').value.trim();
  if (id !== conversation.id) startConversation(id);  // another conversation: new devices
  const button = $('#send-turn');
  button.disabled = true;
  setNotice('Sending…');
  try {
    const response = await fetch('/v1/generations', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ messages: [{ role: 'user', content: $('#turn-question').value }],
                             conversation_id: id }),
    });
    let body = null;
    try {
      body = await response.json();
    } catch (_) { /* not JSON: a proxy's page */ }
    if (!response.ok || !body || !body.conversation_url) {
      const err = body && body.error;
      setNotice('Send failed: ' + (err ? err.code + ': ' + err.message
        : 'HTTP ' + response.status), true);
      return;
    }
    conversation.created.push(body.id);
    setNotice('Turn ' + conversation.created.length + ' created (' + body.id + ').');
    if (!conversation.url) {
      conversation.url = body.conversation_url;
      for (const name of DEVICE_NAMES) addDevice(name);
    }
  } catch (err) {
    setNotice('Send failed: ' + err.message, true);
  } finally {
    button.disabled = false;
  }
}

startConversation(newConversationId());
$('#turn-form').addEventListener('submit', sendTurn);
$('#new-conversation').addEventListener('click', () => {
  startConversation(newConversationId());
  setNotice('A new conversation: its first turn opens the devices.');
});
