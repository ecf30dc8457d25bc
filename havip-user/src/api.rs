//! havipd's HTTP API: JSON over HTTP on `<run dir>/control.sock` (mode 0660, group
//! `[api] socket_group`), and on a TCP address only if `[api] listen` is set, where every
//! request must carry `Authorization: Bearer <token>`.
//!
//! | method and path | body | what |
//! |---|---|---|
//! | `POST /v1/vips` | `VipRequest` | get a pool VIP, bound and remapped (201) |
//! | `GET /v1/vips` | | the pool and who holds what |
//! | `DELETE /v1/vips/{app}[?vip=ADDR]` | | release the app's VIPs (or one) |
//! | `POST /v1/bind` | `{"vip", "nic"}` | pin a VIP to a NIC |
//! | `POST /v1/unbind` | `{"vip"}` | drop the pin |
//! | `GET /v1/explain/{vip}` | | candidates, paths, costs, decision |
//! | `POST /v1/rerank` | | rank every VIP now |
//!
//! Errors are `{"error": "..."}` with 400 (bad request, naming the field), 404, 409 (valid
//! but not possible now; nothing changed) or 503 (havipd stopping). The server only parses
//! and forwards: every call is decided on havipd's one task, in order, so two requests
//! never see the same free VIP.

use std::{net::IpAddr, path::Path, time::Duration};

use anyhow::Context;
use axum::{
    body::Bytes,
    extract::{Path as UrlPath, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
    Router,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::pool::VipRequest;

/// A call for havipd's task.
#[derive(Debug, Clone)]
pub enum Call {
    Request(VipRequest),
    Release { app: String, vip: Option<IpAddr> },
    List,
    Bind { vip: IpAddr, nic: String },
    Unbind { vip: IpAddr },
    Explain { vip: IpAddr },
    Rerank,
}

/// havipd's answer: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn json(status: u16, body: impl Serialize) -> Self {
        Self { status, body: serde_json::to_value(body).unwrap_or(Value::Null) }
    }
    pub fn message(msg: impl Into<String>) -> Self {
        Self { status: 200, body: json!({ "message": msg.into() }) }
    }
    pub fn error(status: u16, msg: impl Into<String>) -> Self {
        Self { status, body: json!({ "error": msg.into() }) }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.body)).into_response()
    }
}

pub type Calls = mpsc::Sender<(Call, oneshot::Sender<Reply>)>;

#[derive(Clone)]
struct Ctx {
    calls: Calls,
    /// Bearer token required on this listener (TCP), none on the Unix socket.
    token: Option<String>,
}

async fn forward(ctx: &Ctx, call: Call) -> Reply {
    let (tx, rx) = oneshot::channel();
    if ctx.calls.send((call, tx)).await.is_err() {
        return Reply::error(503, "havipd is stopping");
    }
    rx.await.unwrap_or_else(|_| Reply::error(503, "havipd is stopping"))
}

/// Parses a JSON body strictly, naming the offending field in the 400 it returns.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, Reply> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." || path.is_empty() { "(body)".to_string() } else { path };
        Reply::error(400, format!("field `{field}`: {inner}"))
    })
}

fn authorized(ctx: &Ctx, headers: &HeaderMap) -> Result<(), Reply> {
    let Some(token) = &ctx.token else { return Ok(()) };
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(token.as_str()) {
        Ok(())
    } else {
        Err(Reply::error(401, "missing or wrong bearer token (Authorization: Bearer <token from api.token_file>)"))
    }
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
            Err(r) => r,
        }
    }
    async fn list(State(ctx): State<Ctx>) -> Reply {
        forward(&ctx, Call::List).await
    }
    async fn release(State(ctx): State<Ctx>, UrlPath(app): UrlPath<String>, q: Result<Query<ReleaseQuery>, axum::extract::rejection::QueryRejection>) -> Reply {
        match q {
            Ok(Query(q)) => forward(&ctx, Call::Release { app, vip: q.vip }).await,
            Err(e) => Reply::error(400, format!("query: {e}; the only parameter is vip=ADDRESS")),
        }
    }
    async fn bind(State(ctx): State<Ctx>, body: Bytes) -> Reply {
        match parse::<BindBody>(&body) {
            Ok(b) => forward(&ctx, Call::Bind { vip: b.vip, nic: b.nic }).await,
            Err(r) => r,
        }
    }
    async fn unbind(State(ctx): State<Ctx>, body: Bytes) -> Reply {
        match parse::<UnbindBody>(&body) {
            Ok(b) => forward(&ctx, Call::Unbind { vip: b.vip }).await,
            Err(r) => r,
        }
    }
    async fn explain(State(ctx): State<Ctx>, UrlPath(vip): UrlPath<String>) -> Reply {
        match vip.parse() {
            Ok(vip) => forward(&ctx, Call::Explain { vip }).await,
            Err(_) => Reply::error(400, format!("`{vip}` is not an IP address")),
        }
    }
    async fn rerank(State(ctx): State<Ctx>) -> Reply {
        forward(&ctx, Call::Rerank).await
    }
    // Every route, and the fallback, behind the token check (a no-op on the socket).
    async fn auth(State(ctx): State<Ctx>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
        match authorized(&ctx, req.headers()) {
            Ok(()) => next.run(req).await,
            Err(r) => r.into_response(),
        }
    }
    Router::new()
        .route("/v1/vips", post(request).get(list))
        .route("/v1/vips/{app}", delete(release))
        .route("/v1/bind", post(bind))
        .route("/v1/unbind", post(unbind))
        .route("/v1/explain/{vip}", get(explain))
        .route("/v1/rerank", post(rerank))
        .fallback(|| async { Reply::error(404, "no such endpoint; see the API table in the README (/v1/vips, /v1/bind, ...)") })
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), auth))
        .with_state(ctx)
}

/// Serves the API on the Unix socket `path` (replacing a stale one), mode 0660, owned by
/// `group` if given.
pub fn serve_unix(path: &Path, group: Option<&str>, calls: Calls) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o660))?;
    if let Some(g) = group {
        let gid = group_id(g).with_context(|| format!("api.socket_group: no group `{g}` on this host; create it or change the setting"))?;
        std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| format!("giving {} to group {g}", path.display()))?;
    }
    let app = router(Ctx { calls, token: None });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

/// Serves the API on a TCP address; every request must carry the bearer token.
pub async fn serve_tcp(addr: std::net::SocketAddr, token: String, calls: Calls) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("api.listen: cannot listen on {addr}"))?;
    let app = router(Ctx { calls, token: Some(token) });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    (!g.is_null()).then(|| unsafe { (*g).gr_gid })
}

/// The bearer token in `path` (trimmed); an empty one is refused.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path).with_context(|| format!("api.token_file: cannot read {}", path.display()))?;
    let t = t.trim().to_string();
    anyhow::ensure!(!t.is_empty(), "api.token_file: {} is empty; put a long random token in it", path.display());
    Ok(t)
}

/// One call to the havipd of `run_dir` over its socket: (status, JSON body). For the CLI.
pub fn call(run_dir: &Path, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    let sock = crate::control::socket_path(run_dir);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(&sock)
            .await
            .with_context(|| format!("cannot reach havipd at {} (is it running? pass --run-dir)", sock.display()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "havipd")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))?;
        let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req)).await.context("havipd did not answer within 30 s")??;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        let value = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).with_context(|| format!("unreadable answer from havipd: {}", String::from_utf8_lossy(&body)))? };
        Ok((status, value))
    })
}
