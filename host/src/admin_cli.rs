//! `tidegate tenant …` and `tidegate plugin push`: the admin API from the command line.
//!
//! The API's address and token come from `--url`/`--token` or `TIDEGATE_ADMIN_URL` /
//! `TIDEGATE_ADMIN_TOKEN`. Answers are printed as the API's JSON (pretty), refusals as the
//! API's error on stderr with exit status 1. An `https://` URL speaks TLS, trusting
//! `--ca-file` / `TIDEGATE_ADMIN_CA` when given, else the system's certificate authorities.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

/// Where the API is and who is calling.
#[derive(Args, Clone)]
pub struct Api {
    /// The admin API, e.g. `http://127.0.0.1:9465` (default: `TIDEGATE_ADMIN_URL`).
    #[arg(long, global = true)]
    url: Option<String>,
    /// The operator's or a tenant's token (default: `TIDEGATE_ADMIN_TOKEN`). Prefer the
    /// variable: arguments show in `ps`.
    #[arg(long, global = true)]
    token: Option<String>,
    /// For an `https://` URL: a PEM file of the CA (or the self-signed certificate) to trust
    /// instead of the system's roots (default: `TIDEGATE_ADMIN_CA`).
    #[arg(long, global = true)]
    ca_file: Option<PathBuf>,
}

/// `tidegate tenant …`.
#[derive(Subcommand)]
pub enum TenantCommand {
    /// Add a tenant from a JSON spec (a `[[pipeline.tenant]]` table as JSON); prints its
    /// token, shown only this once.
    Add {
        /// The pipeline (`tenants_from = "nats"`) the tenant belongs to.
        #[arg(long)]
        pipeline: String,
        /// The spec file (JSON), or `-` for stdin.
        spec: PathBuf,
        /// Add it suspended.
        #[arg(long)]
        suspended: bool,
    },
    /// List every tenant.
    List,
    /// Show a tenant (`<pipeline>.<tenant>`): spec, plugins, status on this instance.
    Show {
        /// The tenant's id, `<pipeline>.<tenant>`.
        id: String,
    },
    /// Replace a tenant's spec (plugins given without `sha256` keep theirs).
    Update {
        /// The tenant's id, `<pipeline>.<tenant>`.
        id: String,
        /// The spec file (JSON), or `-` for stdin.
        spec: PathBuf,
    },
    /// Stop a tenant, keeping its checkpoint, until resumed.
    Suspend {
        /// The tenant's id, `<pipeline>.<tenant>`.
        id: String,
    },
    /// Start a suspended tenant again, from its checkpoint.
    Resume {
        /// The tenant's id, `<pipeline>.<tenant>`.
        id: String,
    },
    /// Remove a tenant (its stream and checkpoint stay, unless `--purge`).
    Rm {
        /// The tenant's id, `<pipeline>.<tenant>`.
        id: String,
        /// Delete its data too: its stream (messages and dead letters), its checkpoint and
        /// the plugin components no other tenant uses.
        #[arg(long)]
        purge: bool,
    },
    /// Issue a new token for a tenant (the previous one stops working).
    Token {
        /// The tenant's id, `<pipeline>.<tenant>`.
        id: String,
    },
    /// Print a tenant's dead letters, oldest first.
    DeadLetters {
        /// The tenant's id, `<pipeline>.<tenant>`.
        id: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// From this stream sequence on.
        #[arg(long, default_value_t = 1)]
        from_seq: u64,
    },
}

/// `tidegate plugin push`.
#[derive(Args)]
pub struct PushArgs {
    /// The tenant, `<pipeline>.<tenant>`.
    #[arg(long)]
    tenant: String,
    /// The plugin's name in the tenant's chain.
    #[arg(long)]
    name: String,
    /// The component (`.wasm`).
    file: PathBuf,
    #[command(flatten)]
    api: Api,
}

/// Runs a `tenant` subcommand.
pub fn tenant(command: TenantCommand, api: Api) -> ExitCode {
    let call = match command {
        TenantCommand::Add { pipeline, spec, suspended } => read_spec(&spec).map(|tenant| {
            let body = serde_json::json!({ "pipeline": pipeline, "tenant": tenant, "suspended": suspended });
            ("POST", "/v1/tenants".to_string(), body.to_string().into_bytes())
        }),
        TenantCommand::List => Ok(("GET", "/v1/tenants".into(), Vec::new())),
        TenantCommand::Show { id } => Ok(("GET", format!("/v1/tenants/{id}"), Vec::new())),
        TenantCommand::Update { id, spec } => {
            read_spec(&spec).map(|tenant| ("PUT", format!("/v1/tenants/{id}"), tenant.to_string().into_bytes()))
        }
        TenantCommand::Suspend { id } => Ok(("POST", format!("/v1/tenants/{id}/suspend"), Vec::new())),
        TenantCommand::Resume { id } => Ok(("POST", format!("/v1/tenants/{id}/resume"), Vec::new())),
        TenantCommand::Rm { id, purge } => {
            Ok(("DELETE", format!("/v1/tenants/{id}?purge={purge}"), Vec::new()))
        }
        TenantCommand::Token { id } => Ok(("POST", format!("/v1/tenants/{id}/token"), Vec::new())),
        TenantCommand::DeadLetters { id, limit, from_seq } => Ok((
            "GET",
            format!("/v1/tenants/{id}/dead-letters?limit={limit}&from_seq={from_seq}"),
            Vec::new(),
        )),
    };
    finish(
        call.and_then(|(method, path, body)| {
            request(&api, method, &path, "application/json", &body)
        }),
    )
}

/// Runs `plugin push`.
pub fn push(args: PushArgs) -> ExitCode {
    let call = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))
        .and_then(|bytes| {
            let path = format!("/v1/tenants/{}/plugins/{}", args.tenant, args.name);
            request(&args.api, "PUT", &path, "application/wasm", &bytes)
        });
    finish(call)
}

fn read_spec(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let text = match path.as_os_str() == "-" {
        true => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            text
        }
        false => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    };
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
}

fn finish(outcome: anyhow::Result<serde_json::Value>) -> ExitCode {
    match outcome {
        Ok(answer) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&answer).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("tidegate: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// One call: the answer's JSON on a 2xx, its error otherwise.
fn request(
    api: &Api,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> anyhow::Result<serde_json::Value> {
    let url = api
        .url
        .clone()
        .or_else(|| std::env::var("TIDEGATE_ADMIN_URL").ok())
        .context("no admin API address: pass --url http://HOST:PORT or set TIDEGATE_ADMIN_URL")?;
    let token = api
        .token
        .clone()
        .or_else(|| std::env::var("TIDEGATE_ADMIN_TOKEN").ok())
        .context("no token: set TIDEGATE_ADMIN_TOKEN (the operator's or a tenant's token) or pass --token")?;
    let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => bail!("{url}: the admin API's URL starts with http:// or https://"),
    };
    let (host, prefix) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    let prefix = prefix.trim_end_matches('/');
    let target = match prefix.is_empty() {
        true => path.to_string(),
        false => format!("/{prefix}{path}"),
    };
    let tcp = std::net::TcpStream::connect(host).with_context(|| {
        format!(
            "cannot reach the admin API at {host}: is tidegate running with an [admin] section?"
        )
    })?;
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let answer = match tls {
        false => exchange(tcp, &head, body)?,
        true => {
            let ca_file = api
                .ca_file
                .clone()
                .or_else(|| std::env::var_os("TIDEGATE_ADMIN_CA").map(PathBuf::from));
            let config = tidegate::admin::tls::client_config(ca_file.as_deref())
                .map_err(anyhow::Error::msg)?;
            let name = server_name(host)?;
            let connection = rustls::ClientConnection::new(config, name)
                .context("cannot start a TLS connection")?;
            exchange(rustls::StreamOwned::new(connection, tcp), &head, body).with_context(|| {
                format!("TLS with the admin API at {host} failed (for a private or self-signed certificate, pass --ca-file or set TIDEGATE_ADMIN_CA)")
            })?
        }
    };
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("the admin API's answer has no body")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the admin API's answer has no status")?;
    let json: serde_json::Value = serde_json::from_str(body.trim())
        .unwrap_or_else(|_| serde_json::json!({ "error": body.trim() }));
    if (200..300).contains(&status) {
        return Ok(json);
    }
    let error = json
        .get("error")
        .and_then(|e| e.as_str())
        .unwrap_or("no reason given");
    let hint = match status {
        401 => " (check the token: TIDEGATE_ADMIN_TOKEN or --token)",
        403 => " (a tenant token may only use its own tenant)",
        _ => "",
    };
    bail!("{method} {path}: {status}: {error}{hint}")
}

/// Sends one request on `stream` and reads the whole answer (the API closes after it).
fn exchange(mut stream: impl Read + Write, head: &str, body: &[u8]) -> anyhow::Result<Vec<u8>> {
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => Ok(answer),
        // A peer closing TLS without its close_notify, after a whole answer, lost nothing.
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {
            Ok(answer)
        }
        Err(err) => Err(err).context("the admin API closed the connection early"),
    }
}

/// The name the server's certificate must carry: the URL's host without its port.
fn server_name(host: &str) -> anyhow::Result<rustls::pki_types::ServerName<'static>> {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    rustls::pki_types::ServerName::try_from(name.to_string())
        .with_context(|| format!("{name}: not a host name or IP address for TLS"))
}
