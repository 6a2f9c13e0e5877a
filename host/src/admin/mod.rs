//! The admin API: tenants and plugins managed at run time (docs/platform.md).
//!
//! JSON over HTTP on its own listener (`[admin] address`), apart from the read-only ops
//! endpoint: this one changes state and takes tokens, so it can be bound and firewalled
//! differently. The operator token may do everything; a tenant's token (issued when the
//! tenant is added) may push its own plugins and read its own status and dead letters.
//!
//! The API only writes records to NATS (`store`); every instance's runtime watches the
//! tenant bucket and starts, restarts, suspends and removes tenant units to match, so a
//! change made through any instance reaches all of them.
//!
//! - `http` — reading requests (the head, then a body bounded per route) and writing JSON
//!   responses.
//! - `gate` — how many connections and uploads are let in at once.
//! - `tokens` — the operator's and tenants' tokens.
//! - `routes` — one function per endpoint.
//! - `purge` — a removed tenant's data deleted with it, on request.
//! - `store` — tenant records in NATS KV, components in the Object Store.
//! - `tls` — the listener's certificate (`[admin.tls]`) and the CLI's trust in it.
//! - `upload` — checking a pushed plugin before it is accepted.

mod gate;
mod http;
mod purge;
mod routes;
pub mod store;
pub mod tls;
mod tokens;
mod upload;

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::admin::AdminConfig;
use crate::config::Config;
use crate::error::Error;
use crate::sandbox::Sandbox;
use http::Response;
pub use store::{TenantRecord, TenantStore};

/// What the API serves from.
pub struct Admin {
    store: Arc<TenantStore>,
    config: Arc<Config>,
    sandbox: Arc<Sandbox>,
    js: async_nats::jetstream::Context,
    /// SHA-256 of the operator token.
    operator: String,
    /// Largest plugin upload, in bytes.
    max_upload: usize,
    /// `[admin.tls]`: connections are TLS handshakes first.
    tls: Option<tokio_rustls::TlsAcceptor>,
    gate: gate::Gate,
}

impl Admin {
    /// The API over `store`, with the operator token from the environment or
    /// `admin.token_file` (registered with the scrubber, never logged).
    pub fn new(
        config: Arc<Config>,
        store: Arc<TenantStore>,
        sandbox: Arc<Sandbox>,
        js: async_nats::jetstream::Context,
    ) -> Result<Admin, Error> {
        let section = admin_section(&config)?;
        let token = section
            .operator_token(|name| std::env::var(name).ok())
            .map_err(|message| Error::Startup { message })?;
        crate::security::remember_secret(&token);
        let max_upload = section.max_upload_mib as usize * 1024 * 1024;
        let tls = match &section.tls {
            Some(tls) => Some(tls::acceptor(tls).map_err(|message| Error::Startup { message })?),
            None => None,
        };
        Ok(Admin {
            store,
            sandbox,
            js,
            operator: tokens::digest(&token),
            max_upload,
            tls,
            config,
            gate: gate::Gate::default(),
        })
    }
}

fn admin_section(config: &Config) -> Result<&AdminConfig, Error> {
    config.admin.as_ref().ok_or_else(|| Error::Startup {
        message: "the admin API needs an [admin] section".into(),
    })
}

/// Binds `admin.address` (a failure is a start-up error).
pub async fn bind(config: &AdminConfig) -> Result<TcpListener, Error> {
    let listener = TcpListener::bind(&config.address)
        .await
        .map_err(|err| Error::Startup {
            message: format!("admin.address = '{}': cannot listen: {err}", config.address),
        })?;
    if let Ok(address) = listener.local_addr() {
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        tracing::info!(%address, scheme, "admin API listening");
        if config.tls.is_none() && !address.ip().is_loopback() {
            tracing::warn!(
                %address,
                "the admin API speaks plain HTTP on a non-loopback address: tokens cross the \
                 network in clear; set [admin.tls] cert_file and key_file"
            );
        }
    }
    Ok(listener)
}

/// Serves requests until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::debug!(error = %err, "admin API accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(place) = admin.gate.connection() else {
            // Answered without waiting on the client (plain HTTP only: a TLS client would
            // read garbage), and closed.
            if admin.tls.is_none() {
                let busy = Response::error(
                    503,
                    format!(
                        "the admin API serves {} connections at once; retry later",
                        gate::MAX_CONNECTIONS
                    ),
                );
                crate::ops::http::refuse_at_once(&stream, http::encode(&busy).as_bytes());
            }
            tracing::debug!(%peer, "admin API connection refused: too many at once");
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _place = place;
            match &admin.tls {
                None => answer(&admin, stream).await,
                Some(acceptor) => {
                    // A client that never finishes its handshake must not hold a task forever.
                    let handshake =
                        tokio::time::timeout(http::HEAD_TIMEOUT, acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(stream)) => answer(&admin, stream).await,
                        Ok(Err(err)) => {
                            tracing::info!(%peer, error = %err, "admin API TLS handshake refused")
                        }
                        Err(_) => tracing::info!(%peer, "admin API TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Reads one request from `stream`, answers it and closes the connection. The caller is
/// authenticated from the head, before any body is read; an upload's body is read only in
/// its turn (see `gate`).
async fn answer(admin: &Admin, mut stream: impl http::Connection) {
    let head = match http::read_head(&mut stream).await {
        Ok(Some(head)) => head,
        Ok(None) => return,
        Err(err) => {
            tracing::debug!(error = %err, "admin API request failed");
            return;
        }
    };
    let (method, path) = (head.method.clone(), head.path.clone());
    let response = async {
        let caller = routes::authenticate(admin, head.authorization.as_deref()).await?;
        let (_turn, limit) = match routes::upload_of(&method, &path) {
            Some(tenant) => {
                routes::own_tenant(&caller, tenant)?;
                (Some(admin.gate.upload(tenant).await?), admin.max_upload)
            }
            None => (None, http::MAX_JSON_BODY),
        };
        match http::read_body(&mut stream, head, limit).await {
            Ok(Some(request)) => Ok(Some(routes::handle(admin, &request, &caller).await)),
            Ok(None) => Ok(None),
            Err(err) => {
                tracing::debug!(error = %err, "admin API request failed");
                Ok(None)
            }
        }
    };
    let (response, written) = match response.await {
        Ok(Some(response)) => {
            let written = http::write(&mut stream, &response).await;
            (response, written)
        }
        // Refused before its body was read.
        Err(response) => {
            let written = http::refuse_unread(&mut stream, &response).await;
            (response, written)
        }
        Ok(None) => return,
    };
    tracing::info!(%method, %path, status = response.status, "admin API");
    if let Err(err) = written {
        tracing::debug!(error = %err, "admin API response failed");
    }
}
