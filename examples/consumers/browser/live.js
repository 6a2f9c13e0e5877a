// Follows a tidegate pipeline's stream over NATS's WebSocket listener, with an ordered
// consumer: an ephemeral, flow-controlled, in-order view that needs no acknowledgements and
// leaves nothing behind on the server. Used by index.html (in a browser) and by
// follow-cli.mjs (the same code from Node, for a check without a browser).
//
// The bare module names resolve through index.html's import map in a browser, and through
// ../node_modules (`npm ci` in examples/consumers) in Node.

import { wsconnect } from "@nats-io/nats-core";
import { DeliverPolicy, jetstream } from "@nats-io/jetstream";

/**
 * Connects to `server` (ws:// or wss://) and calls `onMessage` for each message of `stream`
 * on `filter`, in stream order, until `signal` aborts or `count` messages were delivered.
 *
 * `start`: "new" (default), "all", or a Date (messages stored since then).
 * `onMessage` receives {seq, subject, time, id, headers, payload}, payload parsed as JSON
 * when it is JSON (null when empty: a full-document delete).
 */
export async function follow({
  server, user, pass, stream, filter, start = "new", count = Infinity, signal, onMessage,
}) {
  const nc = await wsconnect({ servers: server, user, pass, name: "tidegate-live-page" });
  try {
    const opts = { filter_subjects: [filter], name_prefix: "live" };
    if (start === "all") {
      opts.deliver_policy = DeliverPolicy.All;
    } else if (start instanceof Date) {
      opts.deliver_policy = DeliverPolicy.StartTime;
      opts.opt_start_time = start.toISOString();
    } else {
      opts.deliver_policy = DeliverPolicy.New;
    }
    const consumer = await jetstream(nc).consumers.get(stream, opts);
    const messages = await consumer.consume();
    signal?.addEventListener("abort", () => messages.stop());
    let delivered = 0;
    for await (const m of messages) {
      onMessage(describe(m));
      delivered += 1;
      if (delivered >= count) break;
    }
  } finally {
    await nc.close();
  }
}

function describe(m) {
  const headers = {};
  for (const [name, values] of m.headers ?? []) {
    if (name !== "Nats-Expected-Last-Msg-Id") headers[name] = values.join(", ");
  }
  let payload = null;
  if (m.data.length > 0) {
    try {
      payload = m.json();
    } catch {
      payload = m.string();
    }
  }
  return {
    seq: m.seq,
    subject: m.subject,
    time: m.timestamp,
    id: headers["Nats-Msg-Id"] ?? null,
    headers,
    payload,
  };
}
