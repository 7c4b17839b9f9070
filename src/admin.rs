//! The operator's HTTP endpoints on their own listener: `/metrics` (Prometheus), `/livez`
//! (the process answers) and `/readyz` (Keyspaces is reachable: a connection is authenticated
//! or one could be made now), for Kubernetes probes and scrapers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::credentials::CredentialCache;
use crate::metrics::metrics;
use crate::session::ProxyContext;

pub struct AdminState {
    pub ctx: Arc<ProxyContext>,
    pub credentials: Option<Arc<CredentialCache>>,
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Brings the gauges that are read rather than counted up to date.
fn refresh_gauges(state: &AdminState) {
    let m = metrics();
    if let Some(pool) = &state.ctx.pool {
        let s = pool.stats();
        for (label, n) in [
            ("ready", s.ready),
            ("draining", s.draining),
            ("connecting", s.connecting),
        ] {
            m.upstream_connections
                .get_or_create(&vec![("state", label)])
                .set(n as i64);
        }
        m.upstream_streams_in_use.set(s.streams_in_use as i64);
        m.prepared_statements.set(pool.prepared.len() as i64);
    }
    if let Some(c) = &state.credentials {
        let v = match (c.is_loaded(), c.expires_in()) {
            (false, _) => -1.0,
            (true, Some(d)) => d.as_secs_f64(),
            (true, None) => f64::INFINITY,
        };
        m.credentials_expiry.set(v);
    }
}

/// Whether the proxy can serve: true when an upstream connection is ready or one can be made.
pub async fn readiness(ctx: &ProxyContext) -> (bool, serde_json::Value) {
    if *ctx.shutdown.borrow() {
        return (false, json!({"ready": false, "reason": "shutting down"}));
    }
    let limit = ctx.upstream.connect_timeout + Duration::from_secs(1);
    match &ctx.pool {
        Some(pool) => {
            let s = pool.stats();
            if s.ready > 0 {
                return (
                    true,
                    json!({"ready": true, "upstream_connections": s.ready}),
                );
            }
            match tokio::time::timeout(limit, pool.group(4, None)).await {
                Ok(Ok(g)) => (
                    true,
                    json!({"ready": true, "upstream_connections": g.ready_count()}),
                ),
                // A reason code: the SDK's text (ARNs, account ids) is for the log.
                Ok(Err(e)) => (false, json!({"ready": false, "reason": e.kind()})),
                Err(_) => (
                    false,
                    json!({"ready": false, "reason": "connecting to Keyspaces timed out"}),
                ),
            }
        }
        None => match ctx.upstream.connect(4, Default::default()).await {
            Ok(_) => (true, json!({"ready": true})),
            Err(e) => (false, json!({"ready": false, "reason": e.kind()})),
        },
    }
}

async fn handle(
    state: Arc<AdminState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/metrics" => {
            refresh_gauges(&state);
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics().encode(),
            )
        }
        "/livez" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let (ready, body) = readiness(&state.ctx).await;
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, "application/json", format!("{body}\n"))
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}

/// Serves the endpoints until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::session::stopping(&mut shutdown) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), req));
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
