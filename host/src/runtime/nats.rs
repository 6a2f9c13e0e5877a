//! The process's one NATS connection, shared by every unit's publisher, checkpoints and
//! leases: connecting (credentials from the URL passed as options), logging disconnects and
//! reconnects once each, and waiting for the first connection with a hint at the cause.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::Error;
use crate::security;

/// A NATS client that connects (and reconnects) in the background.
pub(crate) struct Connection {
    pub(crate) client: async_nats::Client,
    /// The servers, for the "waiting for NATS" line.
    servers: Vec<String>,
    /// The latest connection failure, for the same line.
    failure: Arc<Mutex<Option<String>>>,
}

/// Starts connecting to `config.nats`; fails only on a configuration the client refuses.
pub(crate) async fn connect(config: &Config) -> Result<Connection, Error> {
    let failure = Arc::new(Mutex::new(None::<String>));
    // Credentials in the URL are passed as options: the client ignores them in URLs.
    let urls = security::parse_nats_urls(&config.nats.url)
        .map_err(|message| Error::Startup { message })?;
    let client = security::nats_options(
        &config.nats.auth,
        urls.credentials.as_ref(),
        config.nats.tls.as_ref(),
    )
    .await?
    .retry_on_initial_connect()
    .event_callback({
        // When the connection was lost, while it is: a disconnect and the reconnect are
        // logged once each, the reconnect with how long NATS was away.
        let lost_at = Arc::new(Mutex::new(None::<Instant>));
        let failure = failure.clone();
        move |event| {
            let (lost_at, failure) = (lost_at.clone(), failure.clone());
            async move { on_event(event, &lost_at, &failure) }
        }
    })
    // One address per server: the client does not split a comma-separated string.
    .connect(&urls.servers)
    .await
    .map_err(|err| Error::Startup {
        message: format!(
            "cannot connect to NATS: {}",
            security::scrub(&err.to_string())
        ),
    })?;
    Ok(Connection {
        client,
        servers: urls.servers,
        failure,
    })
}

/// Logs one client event (scrubbed of secrets) and remembers the latest failure.
fn on_event(
    event: async_nats::Event,
    lost_at: &Mutex<Option<Instant>>,
    failure: &Mutex<Option<String>>,
) {
    let Ok(mut lost_at) = lost_at.lock() else {
        return;
    };
    match event {
        async_nats::Event::Disconnected => {
            if lost_at.is_none() {
                *lost_at = Some(Instant::now());
                tracing::warn!(
                    "NATS disconnected; reconnecting (publishing and NATS checkpoints wait)"
                );
            }
        }
        async_nats::Event::Connected => match lost_at.take() {
            Some(since) => tracing::info!(
                away_ms = since.elapsed().as_millis() as u64,
                "NATS reconnected after {:.1} s",
                since.elapsed().as_secs_f64()
            ),
            None => tracing::info!("NATS connected"),
        },
        async_nats::Event::ClientError(err) => {
            let text = security::scrub(&err.to_string()).into_owned();
            tracing::debug!(error = %text, "NATS client error");
            let text = text.trim_start_matches("nats: ").to_string();
            *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
        }
        async_nats::Event::ServerError(err) => {
            let text = security::scrub(&err.to_string()).into_owned();
            tracing::debug!(error = %text, "NATS server error");
            *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
        }
        other => tracing::info!("NATS event: {}", security::scrub(&other.to_string())),
    }
}

impl Connection {
    /// The JetStream context every unit publishes through.
    pub(crate) fn jetstream(&self, config: &Config) -> async_nats::jetstream::Context {
        let ack_timeout = Duration::from_millis(config.nats.ack_timeout_ms);
        let max_in_flight = config
            .pipelines
            .iter()
            .map(|p| p.sink.max_in_flight)
            .sum::<usize>()
            // Tenants the admin API adds later: room for 16 windows per such pipeline
            // (past it, publishes wait for acknowledgements rather than fail).
            + config.managed.len() * 16 * 256;
        // Each pipeline bounds its own window; the client's limit only has to leave room for a
        // full re-publish while the abandoned acks of the previous attempt are still held
        // (for up to the ack timeout) by the client's acker.
        async_nats::jetstream::context::ContextBuilder::new()
            .timeout(ack_timeout)
            .ack_timeout(ack_timeout)
            .max_ack_inflight(2 * max_in_flight + 16)
            .backpressure_on_inflight(true)
            .build(self.client.clone())
    }

    /// Waits until connected, saying every five seconds why not yet. Pipelines need the
    /// connection to check their streams, so a NATS that is merely not up yet is waited for,
    /// not a failure.
    pub(crate) async fn connected(&self) {
        let mut waited = 0;
        while self.client.connection_state() != async_nats::connection::State::Connected {
            if waited % 500 == 100 {
                let failure = self
                    .failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                tracing::warn!(
                    servers = %self.servers.join(","),
                    "waiting for NATS: {}",
                    connect_hint(failure.as_deref())
                );
            }
            waited += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Flushes what is buffered, bounded: NATS may be away.
    pub(crate) async fn flush(&self) {
        match tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "final NATS flush failed"),
            Err(_) => tracing::warn!("final NATS flush timed out (NATS away)"),
        }
    }
}

/// What a NATS connection failure (the client's words) most likely means, and what to do.
fn connect_hint(failure: Option<&str>) -> String {
    let Some(failure) = failure else {
        return "no answer yet".into();
    };
    let lower = failure.to_ascii_lowercase();
    let hint = if lower.contains("authorization") || lower.contains("authentication") {
        "the server refused the credentials; check [nats.auth] (user/password, token, nkey or \
         credentials file)"
    } else if lower.contains("tls") {
        "TLS failed: the server may require TLS (use a tls:// URL and [nats.tls]) or its \
         certificate is not trusted (nats.tls.ca_file)"
    } else if lower.contains("dns") {
        "the host name does not resolve; check nats.url"
    } else if lower.contains("io error") || lower.contains("timed out") || lower.contains("parse") {
        "nothing that speaks NATS answers there; check the host and port in nats.url (the \
         client port, 4222 by default, not the monitoring port) and that nats-server runs"
    } else {
        "retrying"
    };
    format!("{failure}: {hint}")
}
