/* What the demo page shows of an answer beside its text, for the viewers of one generation
 * (demo.js) and the devices of a conversation (conversation.js) alike: the model's
 * reasoning in a pane that folds away (a <details>, so it folds with no script), and each
 * tool call, tool result and data event as a chip. Text always goes through textContent. */

const CHIP_TEXT_LIMIT = 60; // a chip shows the start of its value; its title holds it all

/** Build an element with a class and text. */
export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function shorten(text) {
  return text.length > CHIP_TEXT_LIMIT ? text.slice(0, CHIP_TEXT_LIMIT - 1) + '…' : text;
}

/** A JSON value as compact text, for a chip. */
function compact(value) {
  const text = JSON.stringify(value);
  return text === undefined ? String(value) : text;
}

/** The reasoning pane, the chip row and the answer box, empty; the first two hidden until
 * something comes for them. Append `parts.nodes` where they belong. */
export function buildTypedParts() {
  const reasoning = el('details', 'reasoning');
  reasoning.open = true;
  reasoning.hidden = true;
  const summary = el('summary', null, 'Reasoning');
  const reasoningCount = el('span', 'meta count-reasoning', '');
  summary.append(' ', reasoningCount);
  const reasoningText = el('div', 'reasoning-text');
  reasoning.append(summary, reasoningText);

  const tools = el('div', 'tools');
  tools.hidden = true;
  tools.setAttribute('aria-label', 'Tool calls and data');

  const answer = el('div', 'answer');
  answer.setAttribute('aria-live', 'polite');
  return { reasoning, reasoningCount, reasoningText, tools, answer,
           nodes: [reasoning, tools, answer], reasoningChars: 0 };
}

export function showReasoning(parts, text) {
  parts.reasoningChars += text.length;
  parts.reasoning.hidden = false;
  parts.reasoningText.append(el('span', 'thought', text));
  parts.reasoningCount.textContent = '(' + parts.reasoningChars + ' chars)';
}

function addChip(parts, className, label, title, eventId) {
  const chip = el('span', 'chip ' + className, label);
  chip.title = title;
  chip.dataset.eventId = eventId;
  parts.tools.hidden = false;
  parts.tools.append(chip);
  return chip;
}

/** `call`: a tool_call event's data { index, id, name, arguments }. */
export function showToolCall(parts, call, eventId) {
  const args = typeof call.arguments === 'string' ? call.arguments : compact(call.arguments);
  const chip = addChip(parts, 'tool-call', '⚙ ' + call.name + '(' + shorten(args) + ')',
    call.name + '(' + args + ')\ncall id: ' + call.id, eventId);
  chip.dataset.callId = String(call.id);
  return chip;
}

/** `result`: a tool_result event's data { id, result }; the call it answers is marked. */
export function showToolResult(parts, result, eventId) {
  const text = compact(result.result);
  const chip = addChip(parts, 'tool-result', '↳ ' + shorten(text),
    'result of ' + result.id + ':\n' + text, eventId);
  chip.dataset.callId = String(result.id);
  for (const call of parts.tools.querySelectorAll('.chip.tool-call')) {
    if (call.dataset.callId === String(result.id)) call.classList.add('answered');
  }
  return chip;
}

/** `item`: a data event's data { name, value }. */
export function showData(parts, item, eventId) {
  const text = compact(item.value);
  const chip = addChip(parts, 'data', item.name + ': ' + shorten(text),
    item.name + ': ' + text, eventId);
  chip.dataset.name = String(item.name);
  return chip;
}
