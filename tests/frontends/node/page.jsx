// A small chat page on the AI SDK's `useChat` (tests/browser/test_ai_sdk_page.py bundles it
// with esbuild at test setup: build_page.mjs). As a real app would, it keeps the chat's
// messages in localStorage and, loaded again, starts from them with `resume: true`: a reload
// mid-answer resumes the answer's stream (GET /v1/ai-sdk/chat/{id}/stream) into the same
// message.
import { useChat } from "@ai-sdk/react";
import { DefaultChatTransport } from "ai";
import { useEffect } from "react";
import { createRoot } from "react-dom/client";

const chatId = new URLSearchParams(location.search).get("chat");
const storageKey = `chat:${chatId}`;
const saved = JSON.parse(localStorage.getItem(storageKey) ?? "[]");

function App() {
  const { messages, sendMessage, status, error } = useChat({
    id: chatId,
    messages: saved,
    resume: true,
    transport: new DefaultChatTransport({ api: "/v1/ai-sdk/chat" }),
  });
  useEffect(() => {
    localStorage.setItem(storageKey, JSON.stringify(messages));
  }, [messages]);
  const ask = (event) => {
    event.preventDefault();
    sendMessage({ text: event.currentTarget.elements.question.value });
  };
  return (
    <main>
      <form id="ask" onSubmit={ask}>
        <input name="question" />
        <button type="submit">Ask</button>
      </form>
      <p id="status">{status}</p>
      {error && <p id="error">{error.message}</p>}
      {messages.map((message) => (
        <div key={message.id} className={`message ${message.role}`}>
          {message.parts.map((part, i) =>
            part.type === "text" ? <span key={i} className="text">{part.text}</span> : null)}
        </div>
      ))}
    </main>
  );
}

createRoot(document.getElementById("root")).render(<App />);
