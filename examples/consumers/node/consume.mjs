// Reads a tidegate pipeline's stream with a durable pull consumer (nats.js, @nats-io/*).
//
// Prints one JSON line per change event it processes (stream sequence, message id, subject,
// operation, document key), acknowledging each one after processing it. A durable consumer
// remembers on the server what was acknowledged, so a restart continues where it stopped.
// Heartbeats are acknowledged and skipped; dead letters are reported on stderr.
//
//   cd examples/consumers && npm ci
//   NATS_URL=nats://127.0.0.1:4222 node node/consume.mjs --stream SHOP --filter 'cdc.>'
//
// See docs/consumers.md for what the stream holds and how to choose a filter and a start.

import { parseArgs } from "node:util";
import { connect } from "@nats-io/transport-node";
import {
  AckPolicy,
  DeliverPolicy,
  jetstream,
  jetstreamManager,
} from "@nats-io/jetstream";

const { values: args } = parseArgs({
  options: {
    server: { type: "string", default: process.env.NATS_URL ?? "nats://127.0.0.1:4222" },
    stream: { type: "string", default: "SHOP" },
    filter: { type: "string", default: "cdc.>" },
    durable: { type: "string", default: "example-node" },
    count: { type: "string" },
  },
});
const limit = args.count === undefined ? Infinity : Number(args.count);

const nc = await connect({ servers: args.server.split(",") });
const jsm = await jetstreamManager(nc);
// Created on first use; the same config again is accepted. The server keeps its position.
await jsm.consumers.add(args.stream, {
  durable_name: args.durable,
  filter_subject: args.filter,
  deliver_policy: DeliverPolicy.All, // a new consumer starts at the oldest message
  ack_policy: AckPolicy.Explicit,
  ack_wait: 30_000_000_000, // nanoseconds: unacknowledged for 30 s, delivered again
  max_ack_pending: 1, // one at a time: strict stream order
});
const consumer = await jetstream(nc).consumers.get(args.stream, args.durable);
console.error(`consuming ${args.stream} (${args.filter}) as '${args.durable}'`);

let processed = 0;
const messages = await consumer.consume({ max_messages: 1 });
for await (const m of messages) {
  if (m.subject.endsWith(".heartbeat")) {
    // the pipeline is alive; nothing to process
  } else if (m.subject.endsWith(".dead-letter")) {
    const h = m.headers;
    console.error(
      `dead letter #${m.seq}: ${h?.get("Tidegate-Error-Kind")}: ${h?.get("Tidegate-Error")}`,
    );
  } else {
    const event = m.data.length ? m.json() : null;
    console.log(JSON.stringify({
      seq: m.seq,
      id: m.headers?.get("Nats-Msg-Id"),
      subject: m.subject,
      operation: m.headers?.get("Tidegate-Operation") || event?.operationType,
      documentKey: event?.documentKey,
    }));
    processed += 1;
  }
  m.ack();
  if (processed >= limit) break;
}
await nc.drain();
