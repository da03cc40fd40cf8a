// The Vercel AI SDK's chat client, driven by a test (tests/integration/test_ai_sdk.py): the
// real `Chat` class (@ai-sdk/react's, the one `useChat` holds; no React render needed) with
// the real `DefaultChatTransport`, against the broker's edges.
//
// One JSON command a line on stdin, one JSON answer a line on stdout (errors too), so the
// test decides when things happen (e.g. to let the fake LLM go on only once a second client
// has resumed mid-turn) and holds every deadline itself. Commands:
//   {op: "chat", name, api, id, apiKey, messages?}   a Chat on the edge at `api`
//   {op: "send", name, text}                          sendMessage, not awaited
//   {op: "resume", name}                              resumeStream (what `resume: true` calls)
//   {op: "wait", name, until: "text" | "done"}        answers once the last assistant message
//                                                     has text / the chat is ready or failed
//   {op: "tool-output", name, tool, toolCallId, output}  addToolOutput (a client-side tool)
//   {op: "state", name}                               the chat as it is now
//   {op: "read", api, id, apiKey}                     GET the chat's stream once through the
//                                                     transport, rebuilt by readUIMessageStream
import readline from "node:readline";
import { Chat } from "@ai-sdk/react";
import {
  DefaultChatTransport,
  lastAssistantMessageIsCompleteWithToolCalls,
  readUIMessageStream,
} from "ai";

const chats = new Map();

function transport({ api, apiKey }) {
  return new DefaultChatTransport({
    api,
    headers: apiKey ? { Authorization: `Bearer ${apiKey}` } : {},
  });
}

function snapshot(entry) {
  const { chat } = entry;
  return {
    status: chat.status,
    error: chat.error ? chat.error.message : null,
    messages: JSON.parse(JSON.stringify(chat.messages)),
    finishReason: entry.finishReason ?? null,
    finished: entry.finished,
  };
}

function lastAssistantText(chat) {
  const last = chat.messages.at(-1);
  if (!last || last.role !== "assistant") return "";
  return last.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
}

const POLL_MS = 5;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(entry, until) {
  // Bounded by the test's own deadline: it stops waiting for the answer and kills us.
  for (;;) {
    if (until === "text" && lastAssistantText(entry.chat)) return;
    if (until === "done" && entry.finished) return;
    await sleep(POLL_MS);
  }
}

async function handle(command) {
  const entry = chats.get(command.name);
  switch (command.op) {
    case "chat": {
      const created = { finished: false, finishReason: null };
      created.chat = new Chat({
        id: command.id,
        messages: command.messages ?? [],
        transport: transport(command),
        sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls,
        onFinish: ({ finishReason }) => {
          created.finishReason = finishReason ?? null;
        },
      });
      chats.set(command.name, created);
      return {};
    }
    case "send":
    case "resume": {
      entry.finished = false;
      const run = command.op === "send"
        ? entry.chat.sendMessage({ text: command.text })
        : entry.chat.resumeStream();
      // A sendMessage whose answer ends in tool calls resolves after the automatic follow-up.
      run.then(() => { entry.finished = true; }, (error) => {
        entry.finished = true;
        entry.thrown = String(error);
      });
      return {};
    }
    case "wait":
      await waitFor(entry, command.until);
      return snapshot(entry);
    case "tool-output":
      entry.finished = false;
      entry.chat.addToolOutput({
        tool: command.tool, toolCallId: command.toolCallId, output: command.output,
      }).then(async () => {
        // The automatic follow-up request starts from addToolOutput; wait for it to end.
        while (entry.chat.status === "submitted" || entry.chat.status === "streaming") {
          await sleep(POLL_MS);
        }
        entry.finished = true;
      });
      return {};
    case "state":
      return snapshot(entry);
    case "read": {
      const stream = await transport(command).reconnectToStream({ chatId: command.id });
      if (stream === null) return { message: null };
      let message = null;
      for await (const m of readUIMessageStream({ stream })) message = m;
      return { message: JSON.parse(JSON.stringify(message)) };
    }
    default:
      throw new Error(`unknown op ${command.op}`);
  }
}

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  const command = JSON.parse(line);
  // Each command runs by itself: a `wait` must not hold up the commands after it.
  handle(command).then(
    (result) => process.stdout.write(JSON.stringify({ seq: command.seq, ...result }) + "\n"),
    (error) => process.stdout.write(
      JSON.stringify({ seq: command.seq, thrown: String(error?.stack ?? error) }) + "\n"),
  );
}
