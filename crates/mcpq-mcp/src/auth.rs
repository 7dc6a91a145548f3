//! Credentials on each request. OAuth2 client-credentials tokens are fetched once, shared by
//! concurrent requests, refreshed shortly before they expire and again after a 401.

use std::time::Duration;

use reqwest::RequestBuilder;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::{Auth, Secret};

/// Refresh this long before a token's stated expiry.
const EARLY: Duration = Duration::from_secs(30);

pub(crate) struct Authenticator {
    auth: Auth,
    http: reqwest::Client,
    token: Mutex<Option<(Secret, Instant)>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl Authenticator {
    pub(crate) fn new(auth: Auth, http: reqwest::Client) -> Self {
        Self { auth, http, token: Mutex::new(None) }
    }

    /// True when a 401 may be cured by fetching a new token.
    pub(crate) fn can_refresh(&self) -> bool {
        matches!(self.auth, Auth::Oauth2ClientCredentials { .. })
    }

    /// Drops the cached token.
    pub(crate) async fn invalidate(&self) {
        *self.token.lock().await = None;
    }

    /// Adds the credentials to `req`; an error says why there are none (token endpoint down).
    pub(crate) async fn apply(&self, req: RequestBuilder) -> Result<RequestBuilder, String> {
        Ok(match &self.auth {
            Auth::None => req,
            Auth::Bearer { token } => req.bearer_auth(token.expose()),
            Auth::Basic { username, password } => req.basic_auth(username, Some(password.expose())),
            Auth::ApiKey { header, value } => req.header(header.as_str(), value.expose()),
            Auth::Oauth2ClientCredentials { .. } => {
                req.bearer_auth(self.oauth_token().await?.expose())
            }
        })
    }

    async fn oauth_token(&self) -> Result<Secret, String> {
        let Auth::Oauth2ClientCredentials { token_url, client_id, client_secret, scope } =
            &self.auth
        else {
            return Err("not an OAuth2 server".into());
        };
        // held across the fetch so concurrent requests share one token request
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id.as_str()),
            ("client_secret", client_secret.expose()),
        ];
        if let Some(scope) = scope {
            form.push(("scope", scope.as_str()));
        }
        let resp = self
            .http
            .post(token_url)
            .form(&form)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| format!("token endpoint unreachable: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("token endpoint answered {}", resp.status()));
        }
        let body: TokenResponse =
            resp.json().await.map_err(|e| format!("token endpoint answered no token: {e}"))?;
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(3600));
        let until = Instant::now() + lifetime.saturating_sub(EARLY).max(Duration::from_secs(1));
        let token = Secret::new(body.access_token);
        *cached = Some((token.clone(), until));
        Ok(token)
    }
}
