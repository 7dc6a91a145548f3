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
    /// The cached token, its refresh time, and its generation (one per fetch).
    token: Mutex<Option<(Secret, Instant, u64)>>,
    fetched: std::sync::atomic::AtomicU64,
}

/// Starts every reason that means "no usable credentials": probing other eras will not help.
pub(crate) const NO_CREDENTIALS: &str = "no credentials";

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl Authenticator {
    pub(crate) fn new(auth: Auth, http: reqwest::Client) -> Self {
        Self { auth, http, token: Mutex::new(None), fetched: Default::default() }
    }

    /// True when a 401 may be cured by fetching a new token.
    pub(crate) fn can_refresh(&self) -> bool {
        matches!(self.auth, Auth::Oauth2ClientCredentials { .. })
    }

    /// Drops the cached token if it is still generation `used`: a 401 for a token another
    /// request has already replaced must not throw the new one away.
    pub(crate) async fn invalidate(&self, used: u64) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|(_, _, generation)| *generation == used) {
            *cached = None;
        }
    }

    /// Adds the credentials to `req`, with the generation of the token used (0: no token); an
    /// error says why there are none.
    pub(crate) async fn apply(&self, req: RequestBuilder) -> Result<(RequestBuilder, u64), String> {
        Ok(match &self.auth {
            Auth::None => (req, 0),
            Auth::Bearer { token } => (req.bearer_auth(token.expose()), 0),
            Auth::Basic { username, password } => {
                (req.basic_auth(username, Some(password.expose())), 0)
            }
            Auth::ApiKey { header, value } => (req.header(header.as_str(), value.expose()), 0),
            Auth::Oauth2ClientCredentials { .. } => {
                let (token, generation) = self.oauth_token().await?;
                (req.bearer_auth(token.expose()), generation)
            }
        })
    }

    /// The credential headers as name/value pairs, for a client that builds its own requests.
    pub(crate) async fn header_pairs(
        &self,
        http: &reqwest::Client,
        url: &str,
    ) -> Result<Vec<(String, String)>, String> {
        // one source of truth: apply the credentials to a request and read them back
        let req = self.apply(http.get(url)).await?.0.build().map_err(|e| e.to_string())?;
        Ok(req
            .headers()
            .iter()
            .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_owned(), v.to_owned())))
            .collect())
    }

    async fn oauth_token(&self) -> Result<(Secret, u64), String> {
        let Auth::Oauth2ClientCredentials { token_url, client_id, client_secret, scope } =
            &self.auth
        else {
            return Err("not an OAuth2 server".into());
        };
        // held across the fetch so concurrent requests share one token request
        let mut cached = self.token.lock().await;
        if let Some((token, until, generation)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok((token.clone(), *generation));
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
            .map_err(|e| {
                format!("{NO_CREDENTIALS}: token endpoint {token_url} unreachable: {e}")
            })?;
        if !resp.status().is_success() {
            return Err(format!(
                "{NO_CREDENTIALS}: token endpoint {token_url} answered {}",
                resp.status()
            ));
        }
        let body: TokenResponse = resp.json().await.map_err(|e| {
            format!("{NO_CREDENTIALS}: token endpoint {token_url} answered no token: {e}")
        })?;
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(3600));
        let until = Instant::now() + lifetime.saturating_sub(EARLY).max(Duration::from_secs(1));
        let token = Secret::new(body.access_token);
        let generation = self.fetched.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        *cached = Some((token.clone(), until, generation));
        Ok((token, generation))
    }
}
