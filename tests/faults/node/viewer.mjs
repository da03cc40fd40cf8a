// Viewers of one generation, built on the `eventsource` npm package (a WhatWG EventSource).
//
//   node viewer.mjs <events_url> [count]
//
// Opens `count` independent EventSources on the URL. The package reconnects by itself with
// Last-Event-ID, as a browser does; this script only records what each one saw. It prints
// `READY` on its own line once every EventSource has fired `open`, `PROGRESS [n, ...]` (messages
// received per viewer) after each message, and when all have finished
// (the server's `end` or `error` event, or a failed connection) ONE JSON line:
//   [{"text", "ids", "reconnects", "terminal", "finish_reason", "code", "served_by",
//     "resumed_at"}, ...]
// then exits 0. `terminal` is "end", "error" (the server's event) or "failed" (the package gave
// up: non-200 status, wrong content type, 204). `served_by` lists the `X-Served-By` header of each connection's response (set
// by the test's load balancer), in order; `resumed_at` is when (epoch ms) the first message
// after the first reconnect arrived, or null. After 60 s it gives up: exit 2, state on stderr.
import {EventSource} from 'eventsource'

const SAFETY_TIMEOUT_MS = 60_000

const [url, countArg] = process.argv.slice(2)
if (!url) {
  process.stderr.write('usage: node viewer.mjs <events_url> [count]\n')
  process.exit(64)
}
const count = Number.parseInt(countArg ?? '1', 10)
if (!Number.isInteger(count) || count < 1) {
  process.stderr.write(`count must be a positive integer, not ${countArg}\n`)
  process.exit(64)
}

const viewers = []
let ready = false

function emit(line) {
  return new Promise((resolve) => process.stdout.write(`${line}\n`, resolve))
}

function report(v) {
  return {
    text: v.text,
    ids: v.ids,
    reconnects: v.reconnects,
    terminal: v.terminal,
    finish_reason: v.finish_reason,
    code: v.code,
    served_by: v.served_by,
    resumed_at: v.resumed_at,
  }
}

async function checkReady() {
  if (!ready && viewers.length === count && viewers.every((v) => v.opened)) {
    ready = true
    await emit('READY')
  }
}

async function checkDone() {
  if (viewers.length === count && viewers.every((v) => v.terminal !== null)) {
    await emit(JSON.stringify(viewers.map(report)))
    process.exit(0)
  }
}

function finish(v, es, terminal, fields) {
  if (v.terminal !== null) return
  es.close()
  Object.assign(v, {terminal}, fields)
  // A viewer may finish before every one has opened (say, the stream ended already).
  v.opened = true
  checkReady().then(checkDone)
}

for (let i = 0; i < count; i++) {
  const v = {
    text: '',
    ids: [],
    reconnects: 0,
    terminal: null,
    finish_reason: null,
    code: null,
    message: null,
    served_by: [],
    resumed_at: null,
    opened: false,
  }
  viewers.push(v)
  // The package lets us supply `fetch`; this one only notes which edge answered.
  const recordingFetch = async (input, init) => {
    const response = await fetch(input, init)
    v.served_by.push(response.headers.get('x-served-by'))
    return response
  }
  const es = new EventSource(url, {fetch: recordingFetch})
  es.addEventListener('open', () => {
    v.opened = true
    checkReady()
  })
  es.onmessage = (event) => {
    v.text += JSON.parse(event.data).text
    v.ids.push(event.lastEventId)
    if (v.reconnects > 0 && v.resumed_at === null) v.resumed_at = Date.now()
    emit(`PROGRESS ${JSON.stringify(viewers.map((w) => w.ids.length))}`)
  }
  es.addEventListener('end', (event) => {
    v.ids.push(event.lastEventId)
    const data = JSON.parse(event.data)
    finish(v, es, 'end', {finish_reason: data.finish_reason ?? null})
  })
  es.addEventListener('error', (event) => {
    // The server's `event: error` arrives as a MessageEvent carrying data; a connection
    // problem is the package's own ErrorEvent (with `code`/`message`, no `data`).
    if (event instanceof MessageEvent) {
      v.ids.push(event.lastEventId)
      const data = JSON.parse(event.data)
      finish(v, es, 'error', {code: data.code ?? null, message: data.message ?? null})
    } else if (es.readyState === EventSource.CONNECTING) {
      v.reconnects += 1 // dropped: the package reconnects by itself with Last-Event-ID
    } else {
      // Failed for good (non-200 status, wrong content type, 204): no more reconnects.
      finish(v, es, 'failed', {code: event.code ?? null, message: event.message ?? null})
    }
  })
}

// Also keeps the process alive while an EventSource waits to reconnect (the package unrefs
// its reconnect timer).
setTimeout(() => {
  process.stderr.write(`timed out after ${SAFETY_TIMEOUT_MS} ms: ${JSON.stringify(viewers)}\n`)
  process.exit(2)
}, SAFETY_TIMEOUT_MS)
