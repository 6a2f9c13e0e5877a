// The page's module (live.js) run from Node over the same WebSocket listener: one JSON line
// per message. A check of the page's code path without a browser (the tests run it).
//
//   cd examples/consumers && npm ci
//   node --experimental-websocket browser/follow-cli.mjs --server ws://127.0.0.1:8080 \
//       --user viewer --pass viewer-secret --stream SHOP --filter 'cdc.>' --start all
//
// Node 22+ has WebSocket built in; Node 20 needs --experimental-websocket.

import { parseArgs } from "node:util";
import { follow } from "./live.js";

const { values: args } = parseArgs({
  options: {
    server: { type: "string", default: "ws://127.0.0.1:8080" },
    user: { type: "string" },
    pass: { type: "string", default: process.env.NATS_PASSWORD },
    stream: { type: "string", default: "SHOP" },
    filter: { type: "string", default: "cdc.>" },
    start: { type: "string", default: "new" }, // new | all | an ISO time
    count: { type: "string" },
  },
});
if (typeof WebSocket === "undefined") {
  console.error("no WebSocket in this Node: use Node 22+, or node --experimental-websocket");
  process.exit(2);
}
const start = ["new", "all"].includes(args.start) ? args.start : new Date(args.start);
await follow({
  server: args.server,
  user: args.user,
  pass: args.pass,
  stream: args.stream,
  filter: args.filter,
  start,
  count: args.count === undefined ? Infinity : Number(args.count),
  onMessage: (m) => console.log(JSON.stringify(m)),
});
