//! Prometheus metrics, with the Prometheus project's own client.
//!
//! One process-wide registry: every connection, pool and handshake reports into it, and threading
//! a handle through every layer would buy nothing but noise. Label sets are small and fixed (no
//! query text, no client addresses), and hot-path series are resolved once, up front.

use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::frame::header::opcode;

/// Label sets, one type per label name: a family can only be given the labels it was declared
/// with, and a value is a `&'static str` chosen by the proxy (never by a peer), so incrementing
/// a series allocates nothing and the number of series stays bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeOutcome {
    pub auth: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorCode {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Opcode {
    pub opcode: &'static str,
}

/// An upstream address: a dozen at most, from DNS and system.peers.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Address {
    pub address: String,
}

type HistogramFamily = Family<Opcode, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs … ~26 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

pub struct Metrics {
    registry: Registry,
    pub client_connections: Gauge,
    pub client_connections_opened: Counter,
    pub client_connections_rejected: Family<Reason, Counter>,
    pub client_closed: Family<Reason, Counter>,
    pub client_handshakes: Family<Outcome, Counter>,
    pub upstream_connections: Family<State, Gauge>,
    /// Addresses of the endpoint, known and usable now (set on each scrape).
    pub upstream_addresses: Family<State, Gauge>,
    /// Failed connection attempts (TCP or TLS) by upstream address: a dozen at most.
    pub upstream_address_failures: Family<Address, Counter>,
    /// Open upstream connections by endpoint address (rebuilt on each scrape).
    pub upstream_address_connections: Family<Address, Gauge>,
    pub upstream_handshakes: Family<HandshakeOutcome, Counter>,
    pub tls_handshake_duration: Histogram,
    requests: Vec<Counter>,
    request_duration: Vec<Histogram>,
    pub upstream_errors: Family<ErrorCode, Counter>,
    pub client_received_bytes: Counter,
    pub client_sent_bytes: Counter,
    pub upstream_streams_in_use: Gauge,
    pub prepared_statements: Gauge,
    pub reprepares: Counter,
    pub keyspace_switches: Counter,
    pub credential_refreshes: Family<Outcome, Counter>,
    pub credentials_expiry: Gauge<f64, AtomicU64>,
}

/// The opcodes a client may send, for per-opcode series.
const REQUEST_OPCODES: [u8; 8] = [
    opcode::STARTUP,
    opcode::OPTIONS,
    opcode::QUERY,
    opcode::PREPARE,
    opcode::EXECUTE,
    opcode::REGISTER,
    opcode::BATCH,
    opcode::AUTH_RESPONSE,
];

fn opcode_slot(op: u8) -> usize {
    REQUEST_OPCODES
        .iter()
        .position(|o| *o == op)
        .unwrap_or(REQUEST_OPCODES.len())
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("keyspaces_proxy");
        let client_connections = Gauge::default();
        registry.register(
            "client_connections",
            "Client connections open now",
            client_connections.clone(),
        );
        let keyspace_switches = Counter::default();
        registry.register(
            "upstream_keyspace_switches",
            "Shared upstream connections whose keyspace a request switched (taken out of rotation)",
            keyspace_switches.clone(),
        );
        let client_connections_opened = Counter::default();
        registry.register(
            "client_connections_opened",
            "Client connections accepted",
            client_connections_opened.clone(),
        );
        let client_connections_rejected = Family::<Reason, Counter>::default();
        registry.register(
            "client_connections_rejected",
            "Client connections closed on accept, by reason",
            client_connections_rejected.clone(),
        );
        let client_closed = Family::<Reason, Counter>::default();
        registry.register(
            "client_connections_closed_by_proxy",
            "Client connections the proxy closed, by reason",
            client_closed.clone(),
        );
        let client_handshakes = Family::<Outcome, Counter>::default();
        registry.register(
            "client_handshakes",
            "Client handshakes by result",
            client_handshakes.clone(),
        );
        let upstream_connections = Family::<State, Gauge>::default();
        registry.register(
            "upstream_connections",
            "Upstream connections by state",
            upstream_connections.clone(),
        );
        let upstream_addresses = Family::<State, Gauge>::default();
        registry.register(
            "upstream_addresses",
            "Addresses of the upstream endpoint (DNS and system.peers) by state: known, usable",
            upstream_addresses.clone(),
        );
        let upstream_address_failures = Family::<Address, Counter>::default();
        registry.register(
            "upstream_address_failures",
            "Failed connection attempts (TCP or TLS) by upstream address",
            upstream_address_failures.clone(),
        );
        let upstream_address_connections = Family::<Address, Gauge>::default();
        registry.register(
            "upstream_address_connections",
            "Open upstream connections by endpoint address",
            upstream_address_connections.clone(),
        );
        let upstream_handshakes = Family::<HandshakeOutcome, Counter>::default();
        registry.register(
            "upstream_handshakes",
            "Upstream connection attempts by authentication and result",
            upstream_handshakes.clone(),
        );
        let tls_handshake_duration = latency_histogram();
        registry.register(
            "upstream_tls_handshake_duration_seconds",
            "TLS handshake time with Keyspaces",
            tls_handshake_duration.clone(),
        );
        let requests_family = Family::<Opcode, Counter>::default();
        registry.register(
            "requests",
            "Client requests by opcode",
            requests_family.clone(),
        );
        let duration_family: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from sending a request upstream to its answer, by opcode",
            duration_family.clone(),
        );
        let names = REQUEST_OPCODES
            .iter()
            .map(|o| opcode::name(*o))
            .chain(["UNKNOWN"]);
        let (mut requests, mut request_duration) = (Vec::new(), Vec::new());
        for name in names {
            requests.push(requests_family.get_or_create_owned(&Opcode { opcode: name }));
            request_duration.push(duration_family.get_or_create_owned(&Opcode { opcode: name }));
        }
        let upstream_errors = Family::<ErrorCode, Counter>::default();
        registry.register(
            "upstream_errors",
            "ERROR responses from Keyspaces by CQL error code (throttling shows as write_timeout/read_timeout)",
            upstream_errors.clone(),
        );
        let client_received_bytes = Counter::default();
        registry.register(
            "client_received_bytes",
            "Bytes received from clients",
            client_received_bytes.clone(),
        );
        let client_sent_bytes = Counter::default();
        registry.register(
            "client_sent_bytes",
            "Bytes sent to clients",
            client_sent_bytes.clone(),
        );
        let upstream_streams_in_use = Gauge::default();
        registry.register(
            "upstream_streams_in_use",
            "Upstream stream ids with a request in flight",
            upstream_streams_in_use.clone(),
        );
        let prepared_statements = Gauge::default();
        registry.register(
            "prepared_statements",
            "Prepared statements remembered for re-preparation",
            prepared_statements.clone(),
        );
        let reprepares = Counter::default();
        registry.register(
            "reprepares",
            "Statements re-prepared transparently after UNPREPARED",
            reprepares.clone(),
        );
        let credential_refreshes = Family::<Outcome, Counter>::default();
        registry.register(
            "credential_refreshes",
            "AWS credential loads by result",
            credential_refreshes.clone(),
        );
        let credentials_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "credentials_expiry_seconds",
            "Seconds until the current AWS credentials expire: negative once expired, -Inf without credentials, +Inf for credentials that never expire",
            credentials_expiry.clone(),
        );
        // Known series start at zero, so dashboards and alerts see them before the first event.
        let _ = client_connections_rejected.get_or_create_owned(&Reason {
            reason: "connection_limit",
        });
        for reason in ["not_reading", "protocol_error", "handshake_timeout"] {
            let _ = client_closed.get_or_create_owned(&Reason { reason });
        }
        for result in ["ok", "bad_credentials", "upstream_error", "protocol_error"] {
            let _ = client_handshakes.get_or_create_owned(&Outcome { result });
        }
        // upstream_connections is set on each scrape in pooled mode only: dedicated mode has
        // no pool, and zeros there would fire KeyspacesProxyNoReadyUpstream for ever.
        for auth in ["sigv4", "plain"] {
            for result in [
                "ok",
                "rejected",
                "refused",
                "tls_error",
                "connect_error",
                "timeout",
                "credentials_error",
                "protocol_error",
            ] {
                let _ = upstream_handshakes.get_or_create_owned(&HandshakeOutcome { auth, result });
            }
        }
        for code in [
            "write_timeout",
            "read_timeout",
            "server_error",
            "overloaded",
            "unavailable",
            "unprepared",
            "unauthorized",
            "invalid",
        ] {
            let _ = upstream_errors.get_or_create_owned(&ErrorCode { code });
        }
        for result in ["ok", "error"] {
            let _ = credential_refreshes.get_or_create_owned(&Outcome { result });
        }
        Metrics {
            registry,
            client_connections,
            client_connections_opened,
            client_connections_rejected,
            client_closed,
            client_handshakes,
            upstream_connections,
            upstream_addresses,
            upstream_address_failures,
            upstream_address_connections,
            upstream_handshakes,
            tls_handshake_duration,
            requests,
            request_duration,
            upstream_errors,
            client_received_bytes,
            client_sent_bytes,
            upstream_streams_in_use,
            prepared_statements,
            reprepares,
            keyspace_switches,
            credential_refreshes,
            credentials_expiry,
        }
    }

    pub fn request(&self, op: u8, bytes: usize) {
        self.requests[opcode_slot(op)].inc();
        self.client_received_bytes.inc_by(bytes as u64);
    }

    pub fn request_done(&self, op: u8, elapsed: Duration) {
        self.request_duration[opcode_slot(op)].observe(elapsed.as_secs_f64());
    }

    pub fn sent_to_client(&self, bytes: usize) {
        self.client_sent_bytes.inc_by(bytes as u64);
    }

    pub fn count<L>(family: &Family<L, Counter>, labels: L)
    where
        L: Clone + std::hash::Hash + Eq + EncodeLabelSet,
    {
        family.get_or_create(&labels).inc();
    }

    /// The exposition text for a scrape.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn metrics() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = metrics();
        m.request(opcode::QUERY, 100);
        m.request_done(opcode::QUERY, Duration::from_millis(2));
        Metrics::count(
            &m.upstream_errors,
            ErrorCode {
                code: crate::frame::messages::error_code::name(0x1100),
            },
        );
        let text = m.encode();
        assert!(
            text.contains("keyspaces_proxy_requests_total{opcode=\"QUERY\"}"),
            "{text}"
        );
        assert!(
            text.contains("keyspaces_proxy_request_duration_seconds_bucket{"),
            "{text}"
        );
        assert!(text.contains("keyspaces_proxy_upstream_errors_total{code=\"write_timeout\"} "));
        assert!(text.contains("keyspaces_proxy_client_received_bytes_total "));
        // Gauges never end in _total.
        for line in text
            .lines()
            .filter(|l| l.starts_with("# TYPE") && l.ends_with("gauge"))
        {
            assert!(!line.contains("_total "), "{line}");
        }
    }
}
