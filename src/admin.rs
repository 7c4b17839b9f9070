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

use crate::auth::credentials::CredentialCache;
use crate::context::ProxyContext;
use crate::metrics::{metrics, Address, State};
use crate::shutdown::Shutdown;

pub(crate) struct AdminState {
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
    let (known, usable) = state
        .ctx
        .upstream
        .addresses
        .counts(std::time::Instant::now());
    for (label, n) in [("known", known), ("usable", usable)] {
        m.upstream_addresses
            .get_or_create(&State { state: label })
            .set(n as i64);
    }
    // Rebuilt, so that addresses gone from the endpoint leave the output.
    m.upstream_address_connections.clear();
    for (address, n) in state.ctx.upstream.addresses.connections() {
        m.upstream_address_connections
            .get_or_create(&Address {
                address: address.to_string(),
            })
            .set(n as i64);
    }
    if let Some(pool) = &state.ctx.pool {
        let s = pool.stats();
        for (label, n) in [
            ("ready", s.ready),
            ("draining", s.draining),
            ("connecting", s.connecting),
        ] {
            m.upstream_connections
                .get_or_create(&State { state: label })
                .set(n as i64);
        }
        m.upstream_streams_in_use.set(s.streams_in_use as i64);
        m.prepared_statements.set(pool.prepared.len() as i64);
    }
    if let Some(c) = &state.credentials {
        m.credentials_expiry
            .set(c.expiry_seconds().unwrap_or(f64::NEG_INFINITY));
    }
}

/// Whether the proxy can serve, answered at once from what the pool already knows: a probe
/// must never wait for Keyspaces (kubelet gives it a second), and without a ready connection
/// the pool is nudged to open one in the background. Dedicated mode opens a connection per
/// client, so there is nothing to report but the process (and shutdown).
pub(crate) fn readiness(ctx: &ProxyContext) -> (bool, serde_json::Value) {
    if ctx.shutdown.has_begun() {
        return (false, json!({"ready": false, "reason": "shutting_down"}));
    }
    let Some(pool) = &ctx.pool else {
        return (true, json!({"ready": true, "mode": "dedicated"}));
    };
    let s = pool.stats();
    let (known, usable) = ctx.upstream.addresses.counts(std::time::Instant::now());
    let addresses = json!({"known": known, "usable": usable});
    if s.ready > 0 {
        return (
            true,
            json!({"ready": true, "upstream_connections": s.ready, "addresses": addresses}),
        );
    }
    pool.warm_in_background();
    // A reason code: the SDK's text (ARNs, account ids) is for the log.
    let reason = s.last_error.unwrap_or("connecting");
    (
        false,
        json!({"ready": false, "reason": reason, "addresses": addresses}),
    )
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
            let (ready, body) = readiness(&state.ctx);
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

/// Serves the endpoints until `stop` begins (after the proxy's drain: /readyz reports the
/// shutdown while it lasts).
pub(crate) async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: Shutdown) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.begun() => return,
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
