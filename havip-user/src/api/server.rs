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
    if given == Some(token.as_str()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("missing or wrong bearer token (Authorization: Bearer <token from api.token_file>)".into()))
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
        .fallback(|| async { Reply::Err(ApiError::NotFound("no such endpoint; see the API table in the README (/v1/vips, /v1/bind, ...)".into())) })
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
