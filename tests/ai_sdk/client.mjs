// Reads parley's /v1/ai-sdk routes with the AI SDK's own transport and stream reader,
// the way a useChat frontend does, and prints the assembled message as JSON.
//   node client.mjs send   BASE TOKEN CHAT_ID MESSAGE_ID TEXT
//   node client.mjs resume BASE TOKEN CHAT_ID
// AI_PACKAGE names the package to read with: "ai" (the current release, the default),
// "ai-v6" (the last release of version 6) or "ai-v5" (the first release of version 5).
const { DefaultChatTransport, readUIMessageStream } = await import(
  process.env.AI_PACKAGE ?? "ai"
);

const [mode, base, token, chatId, messageId, text] = process.argv.slice(2);
const transport = new DefaultChatTransport({
  api: `${base}/v1/ai-sdk/chat`,
  headers: { Authorization: `Bearer ${token}` },
});

let stream;
if (mode === "send") {
  stream = await transport.sendMessages({
    chatId,
    messages: [{ id: messageId, role: "user", parts: [{ type: "text", text }] }],
    trigger: "submit-message",
    messageId: undefined,
    abortSignal: undefined,
  });
} else if (mode === "resume") {
  stream = await transport.reconnectToStream({ chatId });
  if (stream === null) {
    console.log(JSON.stringify({ none: true }));
    process.exit(0);
  }
} else {
  console.error(`unknown mode ${mode}`);
  process.exit(2);
}

const errors = [];
let last = null;
for await (const message of readUIMessageStream({
  stream,
  onError: (error) => errors.push(String(error)),
})) {
  last = message;
}
console.log(JSON.stringify({ message: last, errors }));
