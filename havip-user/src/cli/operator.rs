//! `havip bind|unbind|explain|rerank`: the operator's calls to havipd's API.

use std::net::IpAddr;

use anyhow::bail;

use crate::cli::Locations;

pub fn bind(loc: &Locations, vip: IpAddr, nic: &str) -> anyhow::Result<()> {
    api(loc, "POST", "/v1/bind", Some(serde_json::json!({ "vip": vip, "nic": nic })), false)
}

pub fn unbind(loc: &Locations, vip: IpAddr) -> anyhow::Result<()> {
    api(loc, "POST", "/v1/unbind", Some(serde_json::json!({ "vip": vip })), false)
}

pub fn explain(loc: &Locations, vip: IpAddr) -> anyhow::Result<()> {
    api(loc, "GET", &format!("/v1/explain/{vip}"), None, false)
}

pub fn rerank(loc: &Locations) -> anyhow::Result<()> {
    api(loc, "POST", "/v1/rerank", None, false)
}

/// How the CLI words a refusal: a 4xx changed nothing; a 5xx's message says what it left.
pub(super) fn refusal(status: u16, why: &str) -> String {
    if status < 500 {
        format!("refused ({status}): {why} (nothing changed)")
    } else {
        format!("failed ({status}): {why}")
    }
}

/// One API call; prints the message (or the JSON with `json`), fails on a non-2xx status.
pub(super) fn api(loc: &Locations, method: &str, path: &str, body: Option<serde_json::Value>, json: bool) -> anyhow::Result<()> {
    let (status, v) = crate::api::client::call(&loc.run_dir, method, path, body)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    if !(200..300).contains(&status) {
        let why = v.get("error").and_then(|e| e.as_str()).map(str::to_string).unwrap_or_else(|| v.to_string());
        bail!("{}", refusal(status, &why));
    }
    if !json {
        if let Some(m) = v.get("message").and_then(|m| m.as_str()) {
            println!("{m}");
        }
    }
    Ok(())
}
