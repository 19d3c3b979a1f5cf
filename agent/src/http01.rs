//! The standalone HTTP-01 responder (RFC 8555 §8.3).
//!
//! It answers `GET /.well-known/acme-challenge/{token}` with the key
//! authorization as `text/plain`, as certbot's standalone server does. Every
//! other path is 404, and a token that fails the syntax check is 404 without
//! a lookup.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use certfleet_proto::challenge::Token;
use tokio::net::TcpListener;

use crate::tokens::Tokens;

/// The router, separate from [`serve`] so tests can drive it directly.
pub fn router(tokens: Arc<Tokens>) -> Router {
    Router::new()
        .route("/.well-known/acme-challenge/{token}", get(challenge))
        .with_state(tokens)
}

/// Serves HTTP-01 on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tokens: Arc<Tokens>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(tokens))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn challenge(State(tokens): State<Arc<Tokens>>, Path(token): Path<String>) -> Response {
    let Ok(token) = Token::parse(&token) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match tokens.get(&token) {
        Some(key_authorization) => (
            [(header::CONTENT_TYPE, "text/plain")],
            key_authorization.to_string(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
