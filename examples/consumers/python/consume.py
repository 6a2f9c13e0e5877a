#!/usr/bin/env python3
"""Reads a tidegate pipeline's stream with a durable pull consumer (nats-py).

Prints one JSON line per change event it processes (stream sequence, message id, subject,
operation, document key) and acknowledges each one only after processing it. Processing is
idempotent across redeliveries: the last processed stream sequence is kept in --state (when
given), and a redelivered message at or below it is acknowledged without processing it again.
Heartbeats are acknowledged and skipped; dead letters are reported on stderr.

    pip install nats-py==2.16.0
    NATS_URL=nats://127.0.0.1:4222 python3 consume.py --stream SHOP --filter 'cdc.>'

See docs/consumers.md for what the stream holds and how to choose a filter and a start.
"""

import argparse
import asyncio
import json
import os
import sys

import nats
from nats.errors import TimeoutError as FetchTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
                   help="NATS URL (default: $NATS_URL, else nats://127.0.0.1:4222)")
    p.add_argument("--stream", default="SHOP", help="the pipeline's sink.stream")
    p.add_argument("--filter", default="cdc.>",
                   help="subjects to read, e.g. 'cdc.shop.customers.*' (default: cdc.>)")
    p.add_argument("--durable", default="example-python",
                   help="durable consumer name: the server remembers what it acknowledged")
    p.add_argument("--state", help="file keeping the last processed stream sequence")
    p.add_argument("--count", type=int, help="exit after processing this many events")
    return p.parse_args()


def load_state(path):
    try:
        with open(path, encoding="utf-8") as f:
            return int(f.read().strip() or 0)
    except (FileNotFoundError, TypeError):
        return 0


def save_state(path, seq):
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(str(seq))
        os.replace(tmp, path)


def process(msg, seq):
    """What a real consumer would do with the event; here: print it as one JSON line."""
    event = json.loads(msg.data) if msg.data else None
    headers = msg.headers or {}
    print(json.dumps({
        "seq": seq,
        "id": headers.get("Nats-Msg-Id"),
        "subject": msg.subject,
        "operation": headers.get("Tidegate-Operation") or (event or {}).get("operationType"),
        "documentKey": (event or {}).get("documentKey"),
    }), flush=True)


async def main():
    args = parse_args()
    nc = await nats.connect(servers=args.server.split(","), max_reconnect_attempts=-1)
    js = nc.jetstream()
    # Created on first use, reused afterwards: the server keeps its position (what was acked).
    sub = await js.pull_subscribe(
        args.filter,
        durable=args.durable,
        stream=args.stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,  # a new consumer starts at the oldest message
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,                       # unacked for 30 s: delivered again
            max_ack_pending=1,                 # one at a time: strict stream order
        ),
    )
    done = load_state(args.state)
    processed = 0
    print(f"consuming {args.stream} ({args.filter}) as '{args.durable}'", file=sys.stderr)
    while args.count is None or processed < args.count:
        try:
            batch = await sub.fetch(batch=1, timeout=5)
        except FetchTimeout:
            continue  # nothing new yet
        for msg in batch:
            seq = msg.metadata.sequence.stream
            if msg.subject.endswith(".heartbeat"):
                pass  # the pipeline is alive; nothing to process
            elif msg.subject.endswith(".dead-letter"):
                h = msg.headers or {}
                print(f"dead letter #{seq}: {h.get('Tidegate-Error-Kind')}: "
                      f"{h.get('Tidegate-Error')}", file=sys.stderr)
            elif seq <= done:
                pass  # a redelivery of what was processed before the ack got lost
            else:
                process(msg, seq)
                done = seq
                save_state(args.state, done)
                processed += 1
            await msg.ack()
    await nc.drain()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
