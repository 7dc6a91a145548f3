//! The MCP client against servers that require credentials: bearer, basic and API-key
//! headers, and OAuth2 client-credentials tokens from an in-process token endpoint (fetched
//! once, shared, refreshed early and after a 401). A 401 is a refusal before execution.

use std::time::Duration;

use anyhow::{Result, bail};
use futures_util::future::join_all;
use mcpq_mcp::{Auth, CallMeta, McpClient, Outcome, Secret, ServerConfig};
use mcpq_tests::auth_server::{Guard, Required, TokenServer};
use mcpq_tests::mcp::{McpServer, Mode};
use serde_json::{Value, json};

/// Two pinned session revisions (`initialize` first) and probing (`server/discover` first).
const ERAS: [(Mode, Option<&str>); 3] = [
    (Mode::SessionSse, Some(mcpq_mcp::SESSION_VERSION)),
    (Mode::SessionJson, Some("2025-06-18")),
    (Mode::Stateless, None),
];

fn client(server: &McpServer, auth: Auth, pin: Option<&str>) -> Result<McpClient> {
    let mut cfg = ServerConfig::new("s", server.url());
    cfg.protocol_version = pin.map(str::to_owned);
    cfg.auth = auth;
    cfg.validate("servers[0]")?;
    Ok(McpClient::new(cfg)?)
}

async fn echo(c: &McpClient, text: &str) -> Outcome<Value> {
    c.call_tool("echo", json!({ "text": text }), &CallMeta::default()).await
}

/// The echoed text of an executed call.
fn echoed(o: Outcome<Value>) -> Result<String> {
    match o {
        Outcome::Executed(Ok(v)) => match v["content"][0]["text"].as_str() {
            Some(t) => Ok(t.to_owned()),
            None => bail!("executed without a text block: {v}"),
        },
        other => bail!("expected an executed call, got {other:?}"),
    }
}

/// The reason of a call that was not delivered.
fn not_delivered(o: Outcome<Value>) -> Result<String> {
    match o {
        Outcome::NotDelivered { reason, .. } => Ok(reason),
        other => bail!("expected NotDelivered, got {other:?}"),
    }
}

async fn right_credential_runs_the_tool(required: Required, auth: Auth) -> Result<()> {
    for (mode, pin) in ERAS {
        let guard = Guard::new(required.clone());
        let server = guard.start_server(mode).await?;
        let c = client(&server, auth.clone(), pin)?;
        for i in 0..3 {
            assert_eq!(echoed(echo(&c, &format!("hi {i}")).await)?, format!("hi {i}"), "{mode:?}");
        }
        assert_eq!(server.executions().len(), 3, "{mode:?}");
        assert_eq!(guard.refused(), 0, "{mode:?}");
    }
    Ok(())
}

/// Each of `wrong` (and no credential at all) is refused with 401 before anything runs; the
/// reason never shows `secret`.
async fn wrong_credentials_are_not_delivered(
    required: Required,
    wrong: Vec<Auth>,
    secret: &str,
) -> Result<()> {
    for (mode, pin) in ERAS {
        for auth in wrong.iter().cloned().chain([Auth::None]) {
            let guard = Guard::new(required.clone());
            let server = guard.start_server(mode).await?;
            let c = client(&server, auth.clone(), pin)?;
            let reason = not_delivered(echo(&c, "hi").await)?;
            assert!(reason.contains("401"), "{mode:?} {auth:?}: {reason}");
            assert!(!reason.contains(secret), "{reason}");
            assert!(server.executions().is_empty(), "{mode:?} {auth:?}");
            assert!(guard.refused() >= 1, "{mode:?} {auth:?}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn bearer_with_the_right_token_runs_the_tool() -> Result<()> {
    right_credential_runs_the_tool(
        Required::Bearer("tok-right".into()),
        Auth::Bearer { token: Secret::new("tok-right") },
    )
    .await
}

#[tokio::test]
async fn bearer_with_a_wrong_or_missing_token_is_not_delivered_and_the_tool_does_not_run()
-> Result<()> {
    wrong_credentials_are_not_delivered(
        Required::Bearer("tok-right".into()),
        vec![
            Auth::Bearer { token: Secret::new("tok-wrong") },
            Auth::Basic { username: "tok-right".into(), password: Secret::new("") },
            Auth::ApiKey { header: "Authorization".into(), value: Secret::new("tok-right") },
        ],
        "tok-wrong",
    )
    .await
}

#[tokio::test]
async fn basic_with_the_right_password_runs_the_tool() -> Result<()> {
    right_credential_runs_the_tool(
        Required::Basic { username: "ada".into(), password: "pa:ss word".into() },
        Auth::Basic { username: "ada".into(), password: Secret::new("pa:ss word") },
    )
    .await
}

#[tokio::test]
async fn basic_with_a_wrong_or_missing_password_is_not_delivered_and_the_tool_does_not_run()
-> Result<()> {
    wrong_credentials_are_not_delivered(
        Required::Basic { username: "ada".into(), password: "pa:ss word".into() },
        vec![
            Auth::Basic { username: "ada".into(), password: Secret::new("wrong-pw") },
            Auth::Basic { username: "bob".into(), password: Secret::new("pa:ss word") },
            Auth::Bearer { token: Secret::new("wrong-pw") },
        ],
        "wrong-pw",
    )
    .await
}

#[tokio::test]
async fn api_key_with_the_right_key_runs_the_tool() -> Result<()> {
    right_credential_runs_the_tool(
        Required::ApiKey { header: "X-Api-Key".into(), value: "key-right".into() },
        // header names are case-insensitive
        Auth::ApiKey { header: "x-api-key".into(), value: Secret::new("key-right") },
    )
    .await
}

#[tokio::test]
async fn api_key_with_a_wrong_or_missing_key_is_not_delivered_and_the_tool_does_not_run()
-> Result<()> {
    wrong_credentials_are_not_delivered(
        Required::ApiKey { header: "X-Api-Key".into(), value: "key-right".into() },
        vec![
            Auth::ApiKey { header: "X-Api-Key".into(), value: Secret::new("key-wrong") },
            Auth::ApiKey { header: "X-Other-Key".into(), value: Secret::new("key-right") },
            Auth::Bearer { token: Secret::new("key-wrong") },
        ],
        "key-wrong",
    )
    .await
}

/// A token endpoint, a server honouring its tokens, and an OAuth2 client config for both.
struct OauthSetup {
    tokens: TokenServer,
    guard: Guard,
    server: McpServer,
}

const CLIENT_ID: &str = "mcpq";
const CLIENT_SECRET: &str = "client-s3cret";

impl OauthSetup {
    async fn start(mode: Mode) -> Result<Self> {
        let tokens = TokenServer::start(CLIENT_ID, CLIENT_SECRET).await?;
        let guard = Guard::new(Required::Oauth2(tokens.tokens()));
        let server = guard.start_server(mode).await?;
        Ok(Self { tokens, guard, server })
    }

    fn auth(&self, secret: &str) -> Auth {
        Auth::Oauth2ClientCredentials {
            token_url: self.tokens.url(),
            client_id: CLIENT_ID.into(),
            client_secret: Secret::new(secret),
            scope: Some("tools:call".into()),
        }
    }

    fn client(&self, pin: Option<&str>) -> Result<McpClient> {
        client(&self.server, self.auth(CLIENT_SECRET), pin)
    }
}

#[tokio::test]
async fn oauth2_first_call_fetches_a_token_and_later_calls_reuse_it() -> Result<()> {
    for (mode, pin) in ERAS {
        let s = OauthSetup::start(mode).await?;
        let c = s.client(pin)?;
        assert_eq!(echoed(echo(&c, "one").await)?, "one");
        assert_eq!(s.tokens.token_requests(), 1, "{mode:?}");
        for i in 0..5 {
            assert_eq!(echoed(echo(&c, &i.to_string()).await)?, i.to_string());
        }
        assert_eq!(s.tokens.token_requests(), 1, "{mode:?}");
        assert_eq!(s.tokens.scopes(), [Some("tools:call".to_owned())]);
        assert_eq!(s.server.executions().len(), 6, "{mode:?}");
        assert_eq!(s.guard.refused(), 0, "{mode:?}");
    }
    Ok(())
}

#[tokio::test]
async fn oauth2_revoked_token_gets_a_401_then_one_refresh_and_the_call_runs_once() -> Result<()> {
    for (mode, pin) in ERAS {
        let s = OauthSetup::start(mode).await?;
        let c = s.client(pin)?;
        echoed(echo(&c, "warm").await)?;
        assert_eq!(s.tokens.token_requests(), 1);
        s.tokens.revoke_all();
        assert_eq!(echoed(echo(&c, "after revoke").await)?, "after revoke", "{mode:?}");
        assert_eq!(s.tokens.token_requests(), 2, "{mode:?}");
        assert_eq!(s.guard.refused(), 1, "{mode:?}");
        let ran: Vec<_> = s
            .server
            .executions()
            .into_iter()
            .filter(|e| e.arguments["text"] == "after revoke")
            .collect();
        assert_eq!(ran.len(), 1, "{mode:?}");
        // the new token is kept
        echoed(echo(&c, "again").await)?;
        assert_eq!((s.tokens.token_requests(), s.guard.refused()), (2, 1), "{mode:?}");
    }
    Ok(())
}

#[tokio::test]
async fn oauth2_token_refused_even_after_refresh_is_not_delivered_after_exactly_one_refresh()
-> Result<()> {
    let s = OauthSetup::start(Mode::Stateless).await?;
    // every token is stale on arrival
    s.tokens.set_validity(Some(Duration::ZERO));
    let c = s.client(Some(mcpq_mcp::STATELESS_VERSION))?;
    let reason = not_delivered(echo(&c, "hi").await)?;
    assert!(reason.contains("401"), "{reason}");
    assert_eq!((s.tokens.token_requests(), s.guard.refused()), (2, 2));
    assert!(s.server.executions().is_empty());
    Ok(())
}

#[tokio::test]
async fn oauth2_token_is_refreshed_before_it_expires_without_a_401() -> Result<()> {
    let s = OauthSetup::start(Mode::Stateless).await?;
    // refreshed 30 s early: the client keeps it for 1 s; the server honours it for 31 s
    s.tokens.set_expires_in(31);
    let c = s.client(Some(mcpq_mcp::STATELESS_VERSION))?;
    echoed(echo(&c, "first").await)?;
    assert_eq!(s.tokens.token_requests(), 1);
    mcpq_tests::eventually(Duration::from_secs(5), "the client refreshes early", || async {
        echoed(echo(&c, "poll").await)?;
        Ok((s.tokens.token_requests() > 1).then_some(()))
    })
    .await?;
    assert_eq!(s.tokens.token_requests(), 2);
    assert_eq!(s.guard.refused(), 0, "a refresh before expiry needs no 401");
    let polls = s.server.executions().len();
    echoed(echo(&c, "last").await)?;
    assert_eq!(s.server.executions().len(), polls + 1);
    Ok(())
}

#[tokio::test]
async fn oauth2_concurrent_first_calls_share_one_token_request() -> Result<()> {
    // pinned: every call asks for the token at once; probing: one call opens, the rest wait
    for (mode, pin) in
        [(Mode::Stateless, Some(mcpq_mcp::STATELESS_VERSION)), (Mode::Stateless, None)]
    {
        let s = OauthSetup::start(mode).await?;
        // a slow endpoint keeps the first fetch open while the others arrive
        s.tokens.set_delay(Duration::from_millis(50));
        let c = s.client(pin)?;
        let calls = (0..16).map(|i| {
            let c = c.clone();
            async move { echoed(echo(&c, &i.to_string()).await) }
        });
        for (i, r) in join_all(calls).await.into_iter().enumerate() {
            assert_eq!(r?, i.to_string(), "{pin:?}");
        }
        assert_eq!(s.tokens.token_requests(), 1, "{pin:?}");
        assert_eq!(s.server.executions().len(), 16, "{pin:?}");
        assert_eq!(s.guard.refused(), 0, "{pin:?}");
    }
    Ok(())
}

#[tokio::test]
async fn oauth2_concurrent_401s_share_one_token_refresh() -> Result<()> {
    let s = OauthSetup::start(Mode::Stateless).await?;
    let c = s.client(Some(mcpq_mcp::STATELESS_VERSION))?;
    echoed(echo(&c, "warm").await)?;
    s.tokens.revoke_all();
    // every call of the burst gets a 401 for the revoked token while the first refresh runs
    s.tokens.set_delay(Duration::from_millis(50));
    let calls = (0..8).map(|i| {
        let c = c.clone();
        async move { echoed(echo(&c, &i.to_string()).await) }
    });
    for (i, r) in join_all(calls).await.into_iter().enumerate() {
        assert_eq!(r?, i.to_string());
    }
    assert_eq!(s.server.executions().len(), 9);
    assert_eq!(s.tokens.token_requests(), 2, "one refresh for the whole burst");
    Ok(())
}

#[tokio::test]
async fn oauth2_wrong_client_secret_is_not_delivered_naming_the_token_endpoint() -> Result<()> {
    for (mode, pin) in ERAS {
        let s = OauthSetup::start(mode).await?;
        let c = client(&s.server, s.auth("not-the-secret"), pin)?;
        let reason = not_delivered(echo(&c, "hi").await)?;
        assert!(reason.contains("token endpoint"), "{mode:?}: {reason}");
        assert!(!reason.contains("not-the-secret"), "{reason}");
        assert!(s.tokens.token_requests() >= 1, "{mode:?}");
        assert_eq!(s.tokens.issued(), 0);
        // nothing reached the MCP server: no token, no request
        assert_eq!(s.server.posts(), 0, "{mode:?}");
        assert!(s.server.executions().is_empty(), "{mode:?}");
    }
    Ok(())
}

#[test]
fn server_config_debug_never_shows_a_secret() {
    let kinds = [
        (Auth::Bearer { token: Secret::new("bearer-s3cret") }, "bearer-s3cret"),
        (
            Auth::Basic { username: "ada".into(), password: Secret::new("basic-s3cret") },
            "basic-s3cret",
        ),
        (
            Auth::ApiKey { header: "X-Api-Key".into(), value: Secret::new("key-s3cret") },
            "key-s3cret",
        ),
        (
            Auth::Oauth2ClientCredentials {
                token_url: "http://127.0.0.1:1/token".into(),
                client_id: "mcpq".into(),
                client_secret: Secret::new("oauth-s3cret"),
                scope: None,
            },
            "oauth-s3cret",
        ),
    ];
    for (auth, secret) in kinds {
        let cfg = ServerConfig { auth, ..ServerConfig::new("s", "http://127.0.0.1:1/mcp") };
        for shown in [format!("{cfg:?}"), format!("{cfg:#?}"), format!("{:?}", cfg.auth)] {
            assert!(!shown.contains(secret) && shown.contains("***"), "{shown}");
        }
    }
}
