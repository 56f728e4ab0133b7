//! `/healthz`, `/readyz`, `/metrics` and `/status` over HTTP/1.1, on the
//! health address and on a local socket, served by hyper (which
//! the Kubernetes client links in anyway) on the daemon's runtime. Every
//! kernel and nft call of a reconcile yields to it, so it answers while a
//! big reconcile runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tracing::debug;

use crate::node_state::NodeState;

/// Binds `addr` and serves the endpoints until the process exits.
pub async fn serve(addr: SocketAddr, state: Arc<NodeState>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(serve_connection(stream, state.clone()));
        }
    });
    Ok(())
}

/// The local socket `overlayd status` asks when no health address is set:
/// beside the lock file, so each node (each daemon) has its own.
pub fn socket_path(subnet_file: &Path) -> PathBuf {
    subnet_file.parent().unwrap_or(Path::new("/")).join(SOCKET_NAME)
}

/// The socket's file name.
const SOCKET_NAME: &str = "overlayd.sock";

/// Serves the endpoints on the Unix socket at `path` (root only: it is
/// made 0600), replacing a socket an earlier daemon left there. The caller
/// holds the node's lock, so no running daemon owns it.
pub fn serve_unix(path: &Path, state: Arc<NodeState>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(serve_connection(stream, state.clone()));
        }
    });
    Ok(())
}

async fn serve_connection<S>(stream: S, state: Arc<NodeState>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        async move {
            let response = match (req.method(), req.uri().path()) {
                (&Method::GET, "/explain") => explain(&state, req.uri().query().unwrap_or("")).await,
                _ => respond(&state, &req),
            };
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(std::time::Duration::from_secs(5))
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(error = %e, "health connection ended with an error");
    }
}

/// Where a running daemon answers.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// Its health address.
    Tcp(SocketAddr),
    /// Its local socket.
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "http://{addr}"),
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// GETs `path` from a running daemon: its status code and body.
pub async fn fetch(endpoint: &Endpoint, path: &str) -> anyhow::Result<(u16, String)> {
    use anyhow::Context;
    let fail = || format!("asking the daemon at {endpoint} (is overlayd running on this node?)");
    let call = async {
        match endpoint {
            Endpoint::Tcp(addr) => get(tokio::net::TcpStream::connect(addr).await?, path).await,
            Endpoint::Unix(socket) => get(tokio::net::UnixStream::connect(socket).await?, path).await,
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), call)
        .await
        .map_err(|_| anyhow::anyhow!("no answer in 5 s"))
        .with_context(fail)?
        .with_context(fail)
}

async fn get<S>(stream: S, path: &str) -> anyhow::Result<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request =
        Request::get(path).header(hyper::header::HOST, "overlayd").body(http_body_util::Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `/explain?src=x/a&dst=y/b&port=80/tcp[&family=6]`: the policy thread's
/// answer, as JSON ([`Explanation`](crate::policy::explain::Explanation)).
async fn explain(state: &NodeState, query: &str) -> Response<Full<Bytes>> {
    use crate::policy::explain::{Query, Request as Question};
    let params: std::collections::HashMap<String, String> =
        form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or_default();
    let answer = async {
        let query = Query::parse(get("src"), get("dst"), get("port"), params.get("family").map(String::as_str))
            .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
        let asked = state.explainer.get().ok_or_else(|| {
            (StatusCode::NOT_FOUND, "this node enforces no policy (etcd mode, or --network-policy=false)".to_string())
        })?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || (StatusCode::SERVICE_UNAVAILABLE, "the policy thread is not answering".to_string());
        asked.send(Question { query, reply }).await.map_err(|_| gone())?;
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), answer).await.map_err(|_| gone())?;
        answer.map_err(|_| gone())?.map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, e))
    };
    let (status, kind, body) = match answer.await {
        Ok(explanation) => {
            (StatusCode::OK, "application/json", serde_json::to_string_pretty(&explanation).unwrap_or_default() + "\n")
        }
        Err((status, e)) => (status, "text/plain; charset=utf-8", e + "\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    response
}

fn respond(state: &NodeState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    let (status, kind, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, TEXT, "ok\n".to_string()),
        (&Method::GET | &Method::HEAD, "/readyz") if state.ready() => (StatusCode::OK, TEXT, "ready\n".to_string()),
        (&Method::GET | &Method::HEAD, "/readyz") => (StatusCode::SERVICE_UNAVAILABLE, TEXT, state.readiness_detail()),
        (&Method::GET | &Method::HEAD, "/metrics") => (StatusCode::OK, OPENMETRICS, state.metrics.render()),
        (&Method::GET | &Method::HEAD, "/status") => {
            let body = serde_json::to_string_pretty(&state.report()).unwrap_or_default() + "\n";
            (StatusCode::OK, "application/json", body)
        }
        (&Method::GET | &Method::HEAD, _) => (StatusCode::NOT_FOUND, TEXT, "not found\n".to_string()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    response
}
