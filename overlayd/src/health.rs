//! `/healthz`, `/readyz` and `/metrics` over HTTP/1.1, served by hyper (which
//! the Kubernetes client links in anyway) on the daemon's runtime. Every
//! kernel and nft call of a reconcile yields to it, so it answers while a
//! big reconcile runs.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::metrics::Metrics;

/// Binds `addr` and serves the endpoints until the process exits.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let response = respond(&metrics, &req);
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(std::time::Duration::from_secs(5))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(error = %e, "health connection ended with an error");
                }
            });
        }
    });
    Ok(())
}

fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    let (status, kind, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, TEXT, "ok\n".to_string()),
        (&Method::GET | &Method::HEAD, "/readyz") if metrics.ready() && metrics.policy.ready() => {
            (StatusCode::OK, TEXT, "ready\n".to_string())
        }
        (&Method::GET | &Method::HEAD, "/readyz") => {
            (StatusCode::SERVICE_UNAVAILABLE, TEXT, metrics.readiness_detail())
        }
        (&Method::GET | &Method::HEAD, "/metrics") => (StatusCode::OK, OPENMETRICS, metrics.render()),
        (&Method::GET | &Method::HEAD, _) => (StatusCode::NOT_FOUND, TEXT, "not found\n".to_string()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    response
}
