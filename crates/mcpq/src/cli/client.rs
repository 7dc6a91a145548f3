//! The CLI's HTTP client for the API: typed answers, and errors that say what to fix (the API's
//! field and message, or how to reach the API).

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::wire::ErrorBody;

/// A client of one mcpq API.
pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    pub(crate) fn new(base: &str, token: Option<String>) -> Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        reqwest::Url::parse(&base).map_err(|e| {
            anyhow!("--api: {base:?} is not a URL ({e}); e.g. http://127.0.0.1:7600")
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self { http, base, token })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Sends a request and decodes a 2xx answer; a 4xx/5xx becomes an error naming the field.
    pub(crate) async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, T)> {
        let url = format!("{}{path}", self.base);
        // a server that accepts and never answers must not hang the CLI; waits ask for 30 s
        let mut req = self.http.request(method, &url).timeout(Duration::from_secs(120));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "cannot reach the mcpq API at {}: is `mcpq serve` running there? \
                     (set --api or MCPQ_API)",
                    self.base
                )
            } else {
                anyhow!("request to {url} failed: {e}")
            }
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.with_context(|| format!("reading the answer of {url}"))?;
        if status.is_success() {
            let v = if bytes.is_empty() {
                serde_json::from_slice(b"null")
            } else {
                serde_json::from_slice(&bytes)
            };
            return Ok((status, v.with_context(|| format!("unexpected answer from {url}"))?));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(ErrorBody { error }) => {
                let hint = if status == StatusCode::UNAUTHORIZED {
                    " (set --token or MCPQ_TOKEN)"
                } else {
                    ""
                };
                match error.field {
                    Some(f) => Err(anyhow!("{f}: {} (HTTP {status}){hint}", error.message)),
                    None => Err(anyhow!("{} (HTTP {status}){hint}", error.message)),
                }
            }
            Err(_) => Err(anyhow!("{url} answered HTTP {status}")),
        }
    }

    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Ok(self.send::<(), T>(Method::GET, path, None, &[]).await?.1)
    }
}

/// Percent-encodes a query or path value.
pub(crate) fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
