//! The one-click approval page: an optional HTTPS listener (`[web]`) that
//! serves the link an approval mail carries, `<base_url>/approve/<token>`.
//!
//! - The token is the capability: whoever holds the link may decide, once.
//!   It is the request's id and [`crate::approval::TOKEN_BYTES`] random
//!   bytes; the coordinator keeps only a hash of the secret, compared in
//!   constant time. An unknown id and a wrong secret get the same 404.
//! - GET shows the request (certificate, version, serial, names,
//!   not-after, the nodes in restart order, expiry) and a form, and changes
//!   nothing: mail scanners and link previews fetch links.
//! - POST decides. The form carries the token in its body, so the decision
//!   never depends on the URL alone. There is no session, cookie or login
//!   for a cross-site request to ride on, so no CSRF token is needed: a
//!   forged POST would have to carry the secret token itself.
//! - A replayed, expired or superseded link gets a plain page saying so
//!   (HTTP 410); nothing is ever an error trace.
//! - No JavaScript, one small inline style sheet, a viewport meta tag: it
//!   reads on a phone. Responses are `no-store`, framed by nobody, and
//!   send no referrer (the URL holds the token).
//! - TLS with the coordinator's cluster identity (renewed in place), or
//!   `cert_file`/`key_file`. Request bodies, header time and connections
//!   are bounded ([`MAX_BODY_BYTES`], [`HEADER_TIMEOUT`],
//!   [`MAX_CONNECTIONS`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use certfleet_proto::clock::{now, rfc3339};
use certfleet_proto::identity::LiveIdentity;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::approval::{
    self, ApprovalError, Decider, Request, State as ReqState, Verdict, html_escape,
};
use crate::fleet::Fleet;

/// The largest request body read (the form is a token, a choice and a
/// comment).
pub const MAX_BODY_BYTES: usize = 8 * 1024;
/// How long a client may take to send its headers, and its TLS handshake.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait to be accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// `[web]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebConfig {
    listen: String,
    base_url: String,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

/// `[web]`: where the page listens, how links to it start, and its
/// certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebConfig {
    pub listen: SocketAddr,
    /// "https://certfleet.example.org:8443", no trailing slash.
    pub base_url: String,
    /// A certificate chain and key (PEM) to serve; `None`: the
    /// coordinator's cluster identity.
    pub cert: Option<(PathBuf, PathBuf)>,
}

/// Checks `[web]`; an error is (key, reason).
pub fn validate_config(raw: RawWebConfig) -> Result<WebConfig, (String, String)> {
    let listen: SocketAddr = raw.listen.parse().map_err(|e| {
        (
            "web.listen".to_owned(),
            format!("{:?} is not an address like 0.0.0.0:8443: {e}", raw.listen),
        )
    })?;
    let base_url = raw.base_url.trim_end_matches('/').to_owned();
    let host = base_url.strip_prefix("https://").unwrap_or_default();
    if host.is_empty() || host.contains(['?', '#', ' ', '"', '<', '>']) {
        return Err((
            "web.base_url".into(),
            format!(
                "{:?} must be the https:// URL admins reach the page at, e.g. \"https://certfleet.example.org:8443\"",
                raw.base_url
            ),
        ));
    }
    let cert = match (raw.cert_file, raw.key_file) {
        (None, None) => None,
        (Some(c), Some(k)) if c.is_absolute() && k.is_absolute() => Some((c, k)),
        (Some(_), Some(_)) => {
            return Err((
                "web.cert_file".into(),
                "cert_file and key_file must be absolute paths".into(),
            ));
        }
        _ => {
            return Err((
                "web.cert_file".into(),
                "give both cert_file and key_file, or neither (to serve the cluster identity)"
                    .into(),
            ));
        }
    };
    Ok(WebConfig {
        listen,
        base_url,
        cert,
    })
}

/// Why the page cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("web.cert_file/key_file {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("web TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// The identity the page serves: `config`'s files, else `cluster`.
pub fn identity(
    config: &WebConfig,
    cluster: Arc<LiveIdentity>,
) -> Result<Arc<LiveIdentity>, WebError> {
    let Some((cert, key)) = &config.cert else {
        return Ok(cluster);
    };
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|e| WebError::Certificate {
            path: p.clone(),
            reason: e.to_string(),
        })
    };
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    LiveIdentity::from_pem(&cert_pem, &key_pem)
        .map(Arc::new)
        .map_err(|e| WebError::Certificate {
            path: cert.clone(),
            reason: e.to_string(),
        })
}

/// Serves the page on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    fleet: Arc<Fleet>,
    identity: Arc<LiveIdentity>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WebError> {
    let mut tls =
        rustls::ServerConfig::builder_with_provider(certfleet_proto::identity::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(identity);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let app = router(fleet);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => return Ok(()),
            p = Arc::clone(&slots).acquire_owned() => p.expect("semaphore never closed"),
        };
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "web: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "web: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(remote));
                    let app = app.clone();
                    async move {
                        use tower::ServiceExt;
                        app.oneshot(req.map(axum::body::Body::new)).await
                    }
                },
            );
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%remote, error = %e, "web: connection ended");
            }
        });
    }
}

/// The page's routes.
pub fn router(fleet: Arc<Fleet>) -> axum::Router {
    axum::Router::new()
        .route("/approve/{token}", get(show).post(decide))
        .fallback(|| async {
            page(
                StatusCode::NOT_FOUND,
                "Not found",
                "<p>There is nothing here.</p>",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(fleet)
}

/// The request a token opens, or the page saying why it opens none.
fn open(fleet: &Fleet, token: &str) -> Result<Request, Box<Response>> {
    let not_found = || {
        page(
            StatusCode::NOT_FOUND,
            "No such approval request",
            "<p>This link does not open any approval request. Check that it was copied whole, or ask an administrator to run <code>certfleet approvals</code>.</p>",
        )
    };
    let Some((id, secret)) = approval::split_token(token) else {
        return Err(Box::new(not_found()));
    };
    match fleet
        .db()
        .approval_by_secret(id, &approval::secret_hash(secret))
    {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(Box::new(not_found())),
        Err(e) => {
            tracing::warn!(error = %e, "web: cannot read the approval request");
            Err(Box::new(page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again later",
                "<p>The coordinator cannot read its records right now. Try again in a minute, or use <code>certfleet approvals</code>.</p>",
            )))
        }
    }
}

/// GET: the plan and the form. Changes nothing.
async fn show(State(fleet): State<Arc<Fleet>>, Path(token): Path<String>) -> Response {
    let r = match open(&fleet, &token) {
        Ok(r) => r,
        Err(page) => return *page,
    };
    if let Some(gone) = gone(&r, now()) {
        return gone;
    }
    let mut body = format!(
        "<p>Version {} of <b>{}</b> waits for your decision.</p>\n{}",
        r.version,
        html_escape(&r.certificate),
        facts_table(&r)
    );
    body.push_str(&format!(
        r#"<form method="post" action="">
<input type="hidden" name="token" value="{}">
<label for="comment">Comment (optional, goes into the audit trail)</label>
<textarea id="comment" name="comment" maxlength="{}" rows="3"></textarea>
<div class="buttons">
<button type="submit" name="decision" value="approve" id="approve">Approve</button>
<button type="submit" name="decision" value="reject" id="reject" class="reject">Reject</button>
</div>
</form>
<p class="note">This link works once: whoever holds it may decide. Opening it decided nothing.
From the coordinator instead: <code>certfleet approve {id}</code> or <code>certfleet reject {id}</code>.</p>
"#,
        html_escape(&token),
        approval::MAX_COMMENT_CHARS,
        id = html_escape(&r.id),
    ));
    page(
        StatusCode::OK,
        &format!("Approve {} version {}?", r.certificate, r.version),
        &body,
    )
}

/// The page for a request no longer open to a decision, if it is not.
fn gone(r: &Request, now: i64) -> Option<Response> {
    let (title, text) = match r.state {
        ReqState::Pending if now < r.expires => return None,
        ReqState::Pending | ReqState::Expired => (
            "This request has expired",
            format!(
                "Request {} for version {} of {} expired at {} without a decision, so it was refused. Nothing was changed by this link.",
                r.id,
                r.version,
                r.certificate,
                rfc3339(r.expires)
            ),
        ),
        ReqState::Superseded => (
            "This request was superseded",
            format!(
                "Request {} for version {} of {} was superseded ({}). Use the link in the newer mail.",
                r.id, r.version, r.certificate, r.comment
            ),
        ),
        ReqState::Approved | ReqState::Rejected => (
            "This link was used already",
            format!(
                "Request {} for version {} of {} was {} by {} at {}. A link decides once; nothing was changed now.",
                r.id,
                r.version,
                r.certificate,
                r.state.name(),
                r.decided_by,
                rfc3339(r.decided)
            ),
        ),
    };
    Some(page(
        StatusCode::GONE,
        title,
        &format!("<p>{}</p>", html_escape(&text)),
    ))
}

/// The form as posted.
#[derive(Deserialize)]
struct Decision {
    token: String,
    decision: String,
    #[serde(default)]
    comment: String,
}

/// POST: decides, with the token from the body.
async fn decide(
    State(fleet): State<Arc<Fleet>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    form: Result<Form<Decision>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(d)) = form else {
        return page(
            StatusCode::BAD_REQUEST,
            "Not a decision",
            "<p>The form was not sent whole. Open the link from the mail again.</p>",
        );
    };
    let verdict = match d.decision.as_str() {
        "approve" => Verdict::Approve,
        "reject" => Verdict::Reject,
        _ => {
            return page(
                StatusCode::BAD_REQUEST,
                "Not a decision",
                "<p>Choose Approve or Reject.</p>",
            );
        }
    };
    let r = match open(&fleet, &d.token) {
        Ok(r) => r,
        Err(page) => return *page,
    };
    if let Some(gone) = gone(&r, now()) {
        return gone;
    }
    let secret = approval::split_token(&d.token).map(|(_, s)| s);
    let decider = Decider::Link(remote);
    match approval::decide(&fleet, &r.id, &decider, verdict, &d.comment, secret) {
        Ok(decided) => {
            let text = match verdict {
                Verdict::Approve => {
                    approval::spawn_approved(Arc::clone(&fleet), decided.clone(), &decider);
                    format!(
                        "Approved. The coordinator now goes on to {}. Follow it with: certfleet status {}",
                        decided.step.describe(decided.version),
                        decided.certificate
                    )
                }
                Verdict::Reject => format!(
                    "Rejected. Nothing is distributed or restarted; version {} stays stored.",
                    decided.version
                ),
            };
            page(
                StatusCode::OK,
                &format!("Request {} {}", decided.id, decided.state.name()),
                &format!("<p id=\"result\">{}</p>", html_escape(&text)),
            )
        }
        Err(e @ ApprovalError::CommentTooLong(_)) => page(
            StatusCode::BAD_REQUEST,
            "Comment too long",
            &format!("<p>{}</p>", html_escape(&e.to_string())),
        ),
        Err(e) => match fleet.db().approval(&r.id) {
            Ok(Some(now_r)) if gone(&now_r, now()).is_some() => {
                gone(&now_r, now()).expect("checked")
            }
            _ => {
                tracing::warn!(id = r.id, error = %e, "web: cannot decide");
                page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Try again later",
                    "<p>The decision could not be recorded. Try again in a minute, or use <code>certfleet approvals</code>.</p>",
                )
            }
        },
    }
}

/// The request's facts and plan as HTML.
fn facts_table(r: &Request) -> String {
    let mut html = String::from("<table>\n");
    for (label, value) in approval::facts(r) {
        html.push_str(&format!(
            "<tr><th>{label}</th><td>{}</td></tr>\n",
            html_escape(&value)
        ));
    }
    html.push_str("</table>\n");
    let heading = if r.step == approval::Step::Distribute {
        "Nodes"
    } else {
        "Restart plan, in order"
    };
    html.push_str(&format!("<h2>{heading}</h2>\n<ol id=\"plan\">\n"));
    for batch in &r.batches {
        html.push_str(&format!("<li>{}</li>\n", html_escape(&batch.join(", "))));
    }
    html.push_str("</ol>\n");
    html
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:40em;margin:0 auto;padding:1em;line-height:1.4;color:#222}\
h1{font-size:1.4em}h2{font-size:1.1em}table{border-collapse:collapse;width:100%}\
th{text-align:left;padding:.3em .6em .3em 0;vertical-align:top;white-space:nowrap}td{padding:.3em 0;overflow-wrap:anywhere}\
textarea{width:100%;box-sizing:border-box;font:inherit}label{display:block;margin-top:1em}\
.buttons{display:flex;gap:1em;margin-top:1em}button{flex:1;font-size:1.1em;padding:.8em;border:0;border-radius:.4em;background:#1a7f37;color:#fff}\
button.reject{background:#b42318}.note{color:#555;font-size:.9em}code{background:#eee;padding:0 .2em}";

/// A whole page: `title` and the `body` HTML (already escaped).
fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<meta name=\"robots\" content=\"noindex\">\n<title>{t} · certfleet</title>\n<style>{STYLE}</style></head>\n<body><h1>{t}</h1>\n{body}</body></html>\n",
        t = html_escape(title)
    );
    let mut response = (status, Html(html)).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
