//! The `/metrics` endpoint both daemons serve for Prometheus: plain HTTP,
//! one route, OpenMetrics text rendered afresh for every scrape.
//!
//! A scraper is trusted no more than any other client: connections are
//! bounded by [`MAX_CONNECTIONS`] (a flood waits in the kernel's backlog,
//! it does not take memory), a request's headers must arrive within
//! [`HEADER_TIMEOUT`], and nothing but `GET /metrics` is answered.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Scrapes served at once; one Prometheus (or two, for HA) needs one each.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The content type of `prometheus_client::encoding::text::encode`'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders the exposition text for one scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` on `listener` with what `render` returns, until
/// `shutdown` completes. Accept errors (out of descriptors) are logged and
/// retried after a pause; they never end the endpoint.
pub async fn serve(listener: TcpListener, render: Render, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => return,
            p = Arc::clone(&slots).acquire_owned() => p.expect("semaphore never closed"),
        };
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let render = Arc::clone(&render);
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &*render)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%remote, error = %e, "metrics: connection ended");
            }
        });
    }
}

/// The answer to one request: the exposition for `GET /metrics`, 404 or
/// 405 for anything else.
fn respond<B>(
    req: &Request<B>,
    render: &(dyn Fn() -> String + Send + Sync),
) -> Response<Full<Bytes>> {
    let status = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            return Response::builder()
                .header(hyper::header::CONTENT_TYPE, CONTENT_TYPE)
                .body(Full::new(Bytes::from(render())))
                .expect("static response parts");
        }
        (_, "/metrics") => StatusCode::METHOD_NOT_ALLOWED,
        _ => StatusCode::NOT_FOUND,
    };
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(
            b"only GET /metrics is served here\n",
        )))
        .expect("static response parts")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_answered() {
        let render = || "# EOF\n".to_owned();
        let req = |m: Method, path: &str| Request::builder().method(m).uri(path).body(()).unwrap();
        let ok = respond(&req(Method::GET, "/metrics"), &render);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()[hyper::header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(
            respond(&req(Method::POST, "/metrics"), &render).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            respond(&req(Method::GET, "/"), &render).status(),
            StatusCode::NOT_FOUND
        );
    }
}
