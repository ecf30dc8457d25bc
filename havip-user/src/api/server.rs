//! The API server: parses and checks each request, then forwards it to the node's event
//! loop and waits for its reply. Nothing is decided here, so two requests never race.

use std::{net::IpAddr, path::Path};

use anyhow::Context;
use axum::{
    body::Bytes,
    extract::{Path as UrlPath, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
    Router,
};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::json;
use tokio::sync::oneshot;
use tracing::{debug, error, warn};

use super::{Answer, ApiError, Call, Calls, Reply, VipRequest};

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        (status, axum::Json(self.body)).into_response()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(json!({ "error": self.to_string() }))).into_response()
    }
}

#[derive(Clone)]
struct Ctx {
    calls: Calls,
    /// Bearer token required on this listener (TCP), none on the Unix socket.
    token: Option<String>,
}

async fn forward(ctx: &Ctx, call: Call) -> Reply {
    let (tx, rx) = oneshot::channel();
    if ctx.calls.send((call, tx)).await.is_err() {
        return Err(ApiError::Unavailable("havipd is stopping".into()));
    }
    rx.await.unwrap_or_else(|_| Err(ApiError::Unavailable("havipd is stopping".into())))
}

/// Parses a JSON body strictly, naming the offending field in the 400 it returns.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." || path.is_empty() { "(body)".to_string() } else { path };
        ApiError::Bad { field, reason: inner.to_string() }
    })
}

fn authorized(ctx: &Ctx, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &ctx.token else {
        return Ok(());
    };
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| token_eq(g.as_bytes(), token.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("missing or wrong bearer token (Authorization: Bearer <token from api.token_file>)".into()))
    }
}

/// Compares a presented token with the real one in time that depends on their lengths only:
/// `==` on strings stops at the first differing byte, so timing how long a refusal takes
/// would tell a client how much of its guess is right. The length may leak; the content
/// does not.
fn token_eq(given: &[u8], token: &[u8]) -> bool {
    given.len() == token.len() && diff_bits(given.iter().zip(token)) == 0
}

/// The OR of `a ^ b` over every pair: 0 only if all pairs are equal. Every pair is visited
/// whatever came before; `black_box` keeps the optimizer from ending the fold early once
/// the result is known to be non-zero.
fn diff_bits<'a>(pairs: impl Iterator<Item = (&'a u8, &'a u8)>) -> u8 {
    pairs.fold(0u8, |acc, (a, b)| std::hint::black_box(acc | (a ^ b)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BindBody {
    vip: IpAddr,
    nic: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnbindBody {
    vip: IpAddr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseQuery {
    vip: Option<IpAddr>,
}

fn router(ctx: Ctx) -> Router {
    async fn request(State(ctx): State<Ctx>, body: Bytes) -> Reply {
        match parse::<VipRequest>(&body) {
            Ok(req) => forward(&ctx, Call::Request(req)).await,
            Err(e) => Err(e),
        }
    }
    async fn list(State(ctx): State<Ctx>) -> Reply {
        forward(&ctx, Call::List).await
    }
    async fn release(State(ctx): State<Ctx>, UrlPath(app): UrlPath<String>, q: Result<Query<ReleaseQuery>, axum::extract::rejection::QueryRejection>) -> Reply {
        match q {
            Ok(Query(q)) => forward(&ctx, Call::Release { app, vip: q.vip }).await,
            Err(e) => Err(ApiError::bad("query", format!("{e}; the only parameter is vip=ADDRESS"))),
        }
    }
    async fn bind(State(ctx): State<Ctx>, body: Bytes) -> Reply {
        match parse::<BindBody>(&body) {
            Ok(b) => forward(&ctx, Call::Bind { vip: b.vip, nic: b.nic }).await,
            Err(e) => Err(e),
        }
    }
    async fn unbind(State(ctx): State<Ctx>, body: Bytes) -> Reply {
        match parse::<UnbindBody>(&body) {
            Ok(b) => forward(&ctx, Call::Unbind { vip: b.vip }).await,
            Err(e) => Err(e),
        }
    }
    async fn explain(State(ctx): State<Ctx>, UrlPath(vip): UrlPath<String>) -> Reply {
        match vip.parse() {
            Ok(vip) => forward(&ctx, Call::Explain { vip }).await,
            Err(_) => Err(ApiError::bad("vip", format!("`{vip}` is not an IP address"))),
        }
    }
    async fn rerank(State(ctx): State<Ctx>) -> Reply {
        forward(&ctx, Call::Rerank).await
    }
    async fn cluster(State(ctx): State<Ctx>) -> Reply {
        forward(&ctx, Call::ClusterStatus).await
    }
    // Every route, and the fallback, behind the token check (a no-op on the socket).
    async fn auth(State(ctx): State<Ctx>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
        match authorized(&ctx, req.headers()) {
            Ok(()) => next.run(req).await,
            Err(e) => e.into_response(),
        }
    }
    Router::new()
        .route("/v1/vips", post(request).get(list))
        .route("/v1/vips/{app}", delete(release))
        .route("/v1/bind", post(bind))
        .route("/v1/unbind", post(unbind))
        .route("/v1/explain/{vip}", get(explain))
        .route("/v1/rerank", post(rerank))
        .route("/v1/cluster", get(cluster))
        .fallback(|| async { Reply::Err(ApiError::NotFound("no such endpoint; see the API table in the README (/v1/vips, /v1/bind, ...)".into())) })
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), auth))
        .with_state(ctx)
}

/// Serves the API on the Unix socket `path` (replacing a stale one), mode 0660, owned by
/// `group` if given: it has that mode and group from the moment it exists at `path` (see
/// [`bind_private`]).
pub fn serve_unix(path: &Path, group: Option<&str>, calls: Calls) -> anyhow::Result<()> {
    let listener = bind_private(path, group)?;
    let name = format!("unix:{}", path.display());
    let app = router(Ctx { calls, token: None });
    tokio::spawn(async move {
        let result = axum::serve(Logged { inner: listener, name: name.clone() }, app).await;
        stopped(&name, result);
    });
    Ok(())
}

/// Binds the Unix socket `path` so that it is never reachable with more than mode 0660 or
/// another group than `group`.
///
/// bind(2) creates the socket file with the mode the process umask leaves (0777 under
/// umask 0); a chmod after it leaves a window in which any local user may connect. The
/// umask is process-wide and the runtime's other threads may create files meanwhile, so it
/// is not touched: the socket is bound in a fresh directory of mode 0700 beside `path`
/// (nobody else can reach anything in it), given its mode and group there, and renamed to
/// `path`. rename(2) is atomic: `path` is the old file or the finished socket, never a
/// socket with the wrong mode. A bound socket keeps serving under its new name.
fn bind_private(path: &Path, group: Option<&str>) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let file_name = path.file_name().with_context(|| format!("{} is not a socket path", path.display()))?;
    let staging = path.with_file_name(format!(".{}.new", file_name.to_string_lossy()));
    // Left by a havipd that died here (one havipd per run directory, checked before this).
    match std::fs::remove_dir_all(&staging) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("removing the stale {}", staging.display())),
        _ => {}
    }
    // create, not create_all: it fails if something appeared there meanwhile. The umask can
    // only make 0700 stricter.
    std::fs::DirBuilder::new().mode(0o700).create(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let staged = staging.join(file_name);
    let bound = (|| {
        let listener = tokio::net::UnixListener::bind(&staged).with_context(|| format!("binding {}", staged.display()))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660)).with_context(|| format!("chmod 660 {}", staged.display()))?;
        if let Some(g) = group {
            let gid = group_id(g).with_context(|| format!("api.socket_group: no group `{g}` on this host; create it or change the setting"))?;
            std::os::unix::fs::chown(&staged, None, Some(gid)).with_context(|| format!("giving {} to group {g}", staged.display()))?;
        }
        std::fs::rename(&staged, path).with_context(|| format!("moving the API socket to {}", path.display()))?;
        Ok(listener)
    })();
    if let Err(e) = std::fs::remove_dir_all(&staging) {
        warn!(dir = %staging.display(), error = %e, "cannot remove the API socket's staging directory");
    }
    bound
}

/// Serves the API on a TCP address; every request must carry the bearer token. A
/// non-loopback address is served, with a warning: the API is plain HTTP, so the token and
/// every call cross the network readable by anyone on the path.
pub async fn serve_tcp(addr: std::net::SocketAddr, token: String, calls: Calls) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("api.listen: cannot listen on {addr}"))?;
    if !addr.ip().to_canonical().is_loopback() {
        warn!(
            %addr,
            "api.listen is not a loopback address: the API is plain HTTP, so the bearer token and every call cross the network in clear text; \
             listen on 127.0.0.1 or ::1 and reach it through an encrypted tunnel or a TLS proxy"
        );
    }
    let name = format!("tcp:{addr}");
    let app = router(Ctx { calls, token: Some(token) });
    tokio::spawn(async move {
        let result = axum::serve(Logged { inner: listener, name: name.clone() }, app).await;
        stopped(&name, result);
    });
    Ok(())
}

/// Logs the end of a listener's server. axum 0.8 never ends one (it retries accept errors
/// itself), so this only speaks if a later axum does: the API is then gone on that listener
/// while havipd runs, which must not go unnoticed.
fn stopped(listener: &str, result: std::io::Result<()>) {
    match result {
        Ok(()) => error!(listener, "the API server stopped; restart havipd to serve the API there again"),
        Err(e) => error!(listener, error = %e, "the API server failed; restart havipd to serve the API there again"),
    }
}

/// A listener whose accept errors are logged with its name (axum's own listeners log them
/// without saying which listener), then retried like axum does: connection-level errors at
/// once, others (such as running out of file descriptors) after a second, so as not to spin.
struct Logged<L> {
    inner: L,
    name: String,
}

async fn accept_failed(listener: &str, e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        debug!(listener, error = %e, "API: a connection went away before it was accepted");
        return;
    }
    error!(listener, error = %e, "API: cannot accept a connection; retrying in 1 s");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}

impl axum::serve::Listener for Logged<tokio::net::UnixListener> {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok(conn) => return conn,
                Err(e) => accept_failed(&self.name, e).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl axum::serve::Listener for Logged<tokio::net::TcpListener> {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok(conn) => return conn,
                Err(e) => accept_failed(&self.name, e).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    (!g.is_null()).then(|| unsafe { (*g).gr_gid })
}

/// The bearer token in `path` (trimmed): the file must be private and not empty (see
/// `config::token`). Called when havipd starts, before anything is applied.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    crate::config::token::read(path).map_err(|reason| anyhow::anyhow!("field `api.token_file`: {reason}; nothing was applied"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_equal_only_byte_for_byte() {
        assert!(token_eq(b"s3cret-token", b"s3cret-token"));
        assert!(token_eq(b"", b""));
        for wrong in [&b"S3cret-token"[..], b"s3cret-tokeN", b"s3cret-tokem", b"s3cret-toke", b"s3cret-token-", b"", b"x"] {
            assert!(!token_eq(wrong, b"s3cret-token"), "{}", String::from_utf8_lossy(wrong));
        }
    }

    #[test]
    fn the_comparison_visits_every_byte_even_after_a_difference() {
        // Differing in the first byte, the middle or only the last: all 12 pairs are read,
        // so the time taken does not say where the first difference is.
        for given in [&b"X3cret-token"[..], b"s3creX-token", b"s3cret-tokeX", b"s3cret-token"] {
            let mut visited = 0;
            let diff = diff_bits(given.iter().zip(b"s3cret-token").inspect(|_| visited += 1));
            assert_eq!(visited, 12, "{}", String::from_utf8_lossy(given));
            assert_eq!(diff == 0, given == b"s3cret-token");
        }
    }

    #[test]
    fn only_the_exact_bearer_token_is_authorized() {
        let (calls, _rx) = tokio::sync::mpsc::channel(1);
        let ctx = Ctx { calls, token: Some("s3cret-token".into()) };
        let with = |v: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert("authorization", v.parse().unwrap());
            }
            authorized(&ctx, &h).is_ok()
        };
        assert!(with(Some("Bearer s3cret-token")));
        for bad in
            [None, Some("Bearer s3cret-toke"), Some("Bearer s3cret-token2"), Some("Bearer S3cret-token"), Some("Basic s3cret-token"), Some("s3cret-token")]
        {
            assert!(!with(bad), "{bad:?} was authorized");
        }
    }
}
