//! The admin API's HTTP/1.1: one request per connection, its head read first (the caller is
//! known before any body is read), a `Content-Length` body up to a limit that depends on the
//! route (plugin uploads are larger than JSON), `Expect: 100-continue` answered, and JSON
//! responses. Hand-written like the ops endpoint's: a
//! handful of routes do not justify a web framework's compile time.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A connection: plain TCP, or TLS over it (`[admin.tls]`).
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// Longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest JSON body accepted.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

/// One request.
pub struct Request {
    /// `GET`, `POST`, `PUT` or `DELETE`.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query (after `?`), possibly empty.
    pub query: String,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
}

impl Request {
    /// The query parameter `name`, if given.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    }
}

/// One response: a status and a JSON body.
#[derive(Debug)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: serde_json::Value,
}

impl Response {
    /// A success.
    pub fn ok(status: u16, body: serde_json::Value) -> Response {
        Response { status, body }
    }

    /// A refusal: `{"error": message}`, scrubbed of secrets (texts from client libraries
    /// pass through here).
    pub fn error(status: u16, message: impl Into<String>) -> Response {
        let message = message.into();
        Response {
            status,
            body: serde_json::json!({ "error": crate::security::scrub(&message) }),
        }
    }
}

/// A request's head, read before its body: enough to know who is calling and what the body
/// would be, so that a body is read only for a caller who may send it.
pub struct Head {
    /// `GET`, `POST`, `PUT` or `DELETE`.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    query: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The body's `Content-Length` (0 without one).
    length: usize,
    expect_continue: bool,
    /// Bytes of the body that arrived with the head.
    early: Vec<u8>,
}

/// Reads one request's head. A head that cannot be served is answered here and `None`
/// returned.
pub async fn read_head(stream: &mut impl Connection) -> std::io::Result<Option<Head>> {
    let mut data = Vec::with_capacity(1024);
    let mut buf = [0u8; 8192];
    let head_end = tokio::time::timeout(HEAD_TIMEOUT, async {
        loop {
            if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(Some(at));
            }
            if data.len() > MAX_HEAD {
                return Ok(None);
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(None);
            }
            data.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let head_end = match head_end {
        Ok(Ok(Some(at))) => at,
        Ok(Err(err)) => return Err(err),
        _ => return Ok(None),
    };
    let text = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut lines = text.lines();
    let mut words = lines.next().unwrap_or_default().split_whitespace();
    let (method, target) = (
        words.next().unwrap_or("").to_string(),
        words.next().unwrap_or(""),
    );
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut head = Head {
        method,
        path: path.to_string(),
        query: query.to_string(),
        authorization: None,
        length: 0,
        expect_continue: false,
        early: data.split_off(head_end + 4),
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => match value.parse() {
                Ok(n) => head.length = n,
                Err(_) => {
                    let refusal = Response::error(400, "Content-Length is not a number");
                    refuse_unread(stream, &refusal).await?;
                    return Ok(None);
                }
            },
            "transfer-encoding" => {
                let refusal =
                    Response::error(411, "send the body with a Content-Length, not chunked");
                refuse_unread(stream, &refusal).await?;
                return Ok(None);
            }
            "authorization" => head.authorization = Some(value.to_string()),
            "expect" => head.expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    Ok(Some(head))
}

/// Reads the body of the request `head` begins, of at most `limit` bytes. A request that
/// cannot be served is answered here and `None` returned.
pub async fn read_body(
    stream: &mut impl Connection,
    head: Head,
    limit: usize,
) -> std::io::Result<Option<Request>> {
    let length = head.length;
    if length > limit {
        let refusal = Response::error(
            413,
            format!("the body is {length} bytes; at most {limit} are accepted here"),
        );
        refuse_unread(stream, &refusal).await?;
        return Ok(None);
    }
    if head.expect_continue {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    let mut body = head.early;
    let mut buf = [0u8; 8192];
    let filled = tokio::time::timeout(BODY_TIMEOUT, async {
        while body.len() < length {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(())
    })
    .await;
    if !matches!(filled, Ok(Ok(()))) || body.len() < length {
        let refusal = Response::error(400, "the body ended before its Content-Length");
        refuse_unread(stream, &refusal).await?;
        return Ok(None);
    }
    body.truncate(length);
    Ok(Some(Request {
        method: head.method,
        path: head.path,
        query: head.query,
        body,
    }))
}

/// How long a connection refused before its body was read is kept open, reading and
/// dropping what the client still sends (see [`refuse_unread`]).
const LINGER: Duration = Duration::from_secs(2);

/// Writes `response` to a request whose body was not read (or not all of it), and closes
/// the connection without resetting it: what the client still sends is read and dropped for
/// at most [`LINGER`], since a socket closed with unread data is reset, and the client then
/// loses the response with it.
pub async fn refuse_unread(
    stream: &mut impl Connection,
    response: &Response,
) -> std::io::Result<()> {
    write(stream, response).await?;
    let mut buf = [0u8; 8192];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    Ok(())
}

/// Writes `response` and closes the connection.
pub async fn write(stream: &mut impl Connection, response: &Response) -> std::io::Result<()> {
    stream.write_all(encode(response).as_bytes()).await?;
    stream.shutdown().await
}

/// `response` as it goes on the wire.
pub fn encode(response: &Response) -> String {
    let mut body = response.body.to_string();
    body.push('\n');
    let reason = match response.status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        response.status,
        body.len()
    );
    if response.status == 401 {
        out.push_str("WWW-Authenticate: Bearer\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out
}
