//! Reading back what landed in a JetStream stream.

use anyhow::Context;
use async_nats::jetstream::{self, message::StreamMessage};

/// Every message currently in `stream`, in sequence order (read one by one with the
/// direct-get API; fine for the tens of thousands of messages tests produce).
pub async fn stream_messages(
    client: &async_nats::Client,
    stream: &str,
) -> anyhow::Result<Vec<StreamMessage>> {
    let js = jetstream::new(client.clone());
    let mut handle = js
        .get_stream(stream)
        .await
        .with_context(|| format!("stream '{stream}' not found"))?;
    let state = handle.info().await.context("stream info")?.state.clone();
    let mut out = Vec::with_capacity(state.messages as usize);
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        match handle.get_raw_message(seq).await {
            Ok(message) => out.push(message),
            // Deleted sequences leave gaps; anything else is a real failure.
            Err(err) if err.to_string().contains("no message found") => {}
            Err(err) => {
                return Err(err).with_context(|| format!("reading seq {seq} of '{stream}'"))
            }
        }
    }
    Ok(out)
}

/// How many messages `stream` holds (0 if it does not exist yet). One request to the server:
/// the stream's info as `get_stream` fetched it (the benchmark polls this while it measures).
pub async fn stream_len(client: &async_nats::Client, stream: &str) -> u64 {
    let js = jetstream::new(client.clone());
    match js.get_stream(stream).await {
        Ok(handle) => handle.cached_info().state.messages,
        Err(_) => 0,
    }
}
