//! The API client the CLI uses: one request over the Unix socket.

use std::{path::Path, time::Duration};

use anyhow::Context;
use axum::body::Bytes;
use serde_json::Value;

/// One call to the havipd of `run_dir` over its socket: (status, JSON body). For the CLI.
pub fn call(run_dir: &Path, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    let sock = super::socket_path(run_dir);
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
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).with_context(|| format!("unreadable answer from havipd: {}", String::from_utf8_lossy(&body)))?
        };
        Ok((status, value))
    })
}
