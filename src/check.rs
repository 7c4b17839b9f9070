//! `keyspaces-proxy check`: walks the path to Keyspaces one step at a time, printing ✔ or ✘
//! with a hint for each failure, so a broken setup is diagnosed in one command.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{Cli, ConfigError, UpstreamParts};
use crate::frame::messages::{self, consistency, error_code, ErrorInfo};
use crate::frame::opcode;
use crate::frame::result::Rows;
use crate::frame::ProtocolVersion;
use crate::upstream::{UpstreamAuth, UpstreamError, UpstreamTarget};

/// A line on stdout; a closed stdout (`check | head -1`) ends the output, not the process.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Default)]
struct Report {
    failed: bool,
}

impl Report {
    fn pass(&mut self, step: &str, detail: impl std::fmt::Display) {
        say!("✔ {step}: {detail}");
    }

    fn fail(&mut self, step: &str, detail: impl std::fmt::Display, hint: &str) {
        self.failed = true;
        say!("✘ {step}: {detail}");
        say!("    fix: {hint}");
    }

    /// A step that cannot run because one it needs failed: not a new failure.
    fn skip(&mut self, step: &str, why: &str) {
        say!("– {step}: skipped ({why})");
    }

    fn finish(self) -> ExitCode {
        if self.failed {
            say!("Some checks failed.");
            ExitCode::FAILURE
        } else {
            say!("All checks passed.");
            ExitCode::SUCCESS
        }
    }
}

fn config_hint(e: &ConfigError) -> &'static str {
    match e {
        ConfigError::NoRegion => "pass --region (e.g. us-east-1) or set AWS_REGION",
        ConfigError::Region { .. } => "region names look like us-east-1, eu-west-2, ap-southeast-1",
        ConfigError::Endpoint(_) => "--endpoint takes HOST or HOST:PORT (IPv6 in brackets)",
        ConfigError::Tls(_) => {
            "--ca-file must be a readable PEM file with at least one certificate"
        }
        ConfigError::Credentials(_) => {
            "configure the AWS credential chain (env, AWS_PROFILE, SSO, IRSA, instance role)"
        }
        _ => "see keyspaces-proxy --help",
    }
}

pub fn tls_hint(e: &std::io::Error) -> &'static str {
    let text = e.to_string();
    if text.contains("UnknownIssuer")
        || text.contains("unknown issuer")
        || text.contains("BadSignature")
    {
        "the certificate does not chain to the trusted roots: Keyspaces needs Amazon Root CA 1 (built in); for the emulator or a private endpoint pass --ca-file"
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        "the certificate is not for this name: set --tls-server-name to the endpoint's DNS name (cassandra.<region>.amazonaws.com), also when dialing an IP or VPC endpoint"
    } else if text.contains("Expired") || text.contains("expired") {
        "the certificate is expired or the local clock is wrong: check the clock (NTP)"
    } else {
        "check that the endpoint speaks TLS on this port (Keyspaces: 9142) and nothing intercepts the connection"
    }
}

fn auth_hint(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("expired") || m.contains("skew") || m.contains("minutes") {
        "the local clock is off: synchronize it (chrony/NTP); SigV4 tolerates only a few minutes"
    } else if m.contains("unknown access key") || m.contains("security token") {
        "Keyspaces does not know this access key: check which credentials the chain finds (AWS_PROFILE, env vars, role)"
    } else if m.contains("session token") {
        "temporary credentials need their session token: check AWS_SESSION_TOKEN or the profile"
    } else if m.contains("signature") {
        "the signature was rejected: check the secret key for this access key and that --region matches the endpoint's region"
    } else {
        "check the credentials and their IAM permissions (cassandra:Connect)"
    }
}

/// Tells where the credentials came from, from their Debug form (which redacts the secret).
fn provider_of(creds: &aws_credential_types::Credentials) -> String {
    let debug = format!("{creds:?}");
    debug
        .split("provider_name: \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("unknown provider")
        .to_owned()
}

/// What the network steps established, for the steps that depend on them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reached {
    Nothing,
    Tls,
}

pub async fn run(cli: &Cli) -> ExitCode {
    let mut report = Report::default();
    let parts = cli.upstream_parts().await;
    configuration_step(cli, &parts, &mut report).await;
    let credentials_ok = credentials_step(&parts, &mut report).await;
    let reached = network_steps(cli, &parts, &mut report).await;
    let target = match parts.into_target(cli) {
        Ok((target, _, _)) if reached == Reached::Tls && credentials_ok => target,
        _ => {
            report.skip("authentication", "needs the TLS and credentials steps");
            report.skip("query", "needs authentication");
            return report.finish();
        }
    };
    let Some(conn) = authentication_step(&target, &mut report).await else {
        report.skip("query", "needs authentication");
        return report.finish();
    };
    query_step(conn, &mut report).await;
    report.finish()
}

async fn configuration_step(cli: &Cli, parts: &UpstreamParts, report: &mut Report) {
    // The client side too: a configuration `check` passes must be one the proxy starts with.
    let client = cli.client_auth().await.err();
    // A part derived from a broken one (no endpoint without a region) says nothing new.
    let mut errors: Vec<&ConfigError> = [
        parts.region.as_ref().err(),
        parts.auth.as_ref().err(),
        parts.address.as_ref().err(),
        parts.server_name.as_ref().err(),
        parts.tls.as_ref().err(),
        client.as_ref(),
    ]
    .into_iter()
    .flatten()
    .filter(|e| !matches!(e, ConfigError::DerivedFromBroken(..)))
    .collect();
    // The region and the credentials can fail for one reason (no region): say it once.
    errors.dedup_by_key(|e| e.to_string());
    for e in &errors {
        report.fail("configuration", e, config_hint(e));
    }
    if errors.is_empty() {
        let region = parts.region.as_ref().ok().and_then(|r| r.as_deref());
        report.pass(
            "configuration",
            format!(
                "region {}, endpoint {}, TLS name {}",
                region.unwrap_or("-"),
                parts.address.as_deref().unwrap_or("-"),
                parts
                    .server_name
                    .as_ref()
                    .map_or_else(|_| "-".to_owned(), |n| n.to_str().into_owned())
            ),
        );
    }
    for w in &parts.warnings {
        say!("  note: {w}");
    }
}

/// Whether signing credentials are there (true when the upstream needs none).
async fn credentials_step(parts: &UpstreamParts, report: &mut Report) -> bool {
    let credentials = match (&parts.auth, &parts.chain_credentials) {
        (Ok((UpstreamAuth::SigV4 { credentials, .. }, _)), _) | (Err(_), Some(credentials)) => {
            credentials
        }
        (Ok(_), _) => {
            report.pass(
                "credentials",
                "none from AWS: the upstream takes a user name and password (--upstream-auth)",
            );
            return true;
        }
        (Err(_), None) => {
            report.skip("credentials", "needs the configuration above");
            return false;
        }
    };
    match credentials.get().await {
        Ok(c) => {
            let expiry = match credentials.expires_in() {
                Some(d) => format!("expire in {} min", d.as_secs() / 60),
                None => "do not expire".to_owned(),
            };
            let key = c.access_key_id();
            let shown = format!("{}…", &key[..key.len().min(8)]);
            report.pass(
                "credentials",
                format!("access key {shown} from {}; they {expiry}", provider_of(&c)),
            );
            true
        }
        Err(e) => {
            report.fail(
                "credentials",
                &e,
                config_hint(&ConfigError::Credentials(e.clone())),
            );
            false
        }
    }
}

async fn authentication_step(
    target: &UpstreamTarget,
    report: &mut Report,
) -> Option<crate::upstream::UpstreamConnection> {
    match target
        .connect(ProtocolVersion::V4, Default::default())
        .await
    {
        Ok(c) => {
            report.pass(
                "authentication",
                "Keyspaces accepted the handshake (the clock is within its tolerance)",
            );
            Some(c)
        }
        Err(UpstreamError::AuthRejected(info)) => {
            report.fail("authentication", &info.message, auth_hint(&info.message));
            if auth_hint(&info.message).contains("clock") {
                report.fail(
                    "clock",
                    "the signature's time was refused",
                    "synchronize the clock (chrony/NTP)",
                );
            }
            None
        }
        Err(e) => {
            report.fail(
                "authentication",
                &e,
                "see the steps above; retry with RUST_LOG=debug for details",
            );
            None
        }
    }
}

async fn query_step(mut conn: crate::upstream::UpstreamConnection, report: &mut Report) {
    let query = messages::query(
        ProtocolVersion::V4,
        1,
        "SELECT * FROM system.local",
        consistency::LOCAL_ONE,
    );
    let reply = async {
        conn.framed.send(query).await.ok()?;
        conn.framed.next().await?.ok()
    };
    match tokio::time::timeout(Duration::from_secs(10), reply).await {
        Ok(Some(f)) if f.opcode() == opcode::RESULT => {
            let detail = Rows::parse(&f.body)
                .ok()
                .and_then(|rows| {
                    let cols = rows.columns.clone()?;
                    let cells = rows.cells().ok()?.into_iter().next()?;
                    let get = |name: &str| {
                        let i = cols.iter().position(|c| c.name == name)?;
                        cells
                            .get(i)
                            .copied()
                            .flatten()
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    };
                    Some(format!(
                        "{} {} ({}), partitioner {}",
                        get("cluster_name")?,
                        get("release_version").unwrap_or_default(),
                        get("data_center").unwrap_or_default(),
                        get("partitioner").unwrap_or_default()
                    ))
                })
                .unwrap_or_else(|| "rows returned".to_owned());
            report.pass("query", format!("SELECT * FROM system.local: {detail}"));
        }
        Ok(Some(f)) => {
            let info = ErrorInfo::parse(&f.body).unwrap_or(ErrorInfo {
                code: -1,
                message: format!("unexpected {}", opcode::name(f.opcode())),
            });
            let hint = if info.code == error_code::UNAUTHORIZED {
                "IAM denies the query: allow cassandra:Select on the system keyspaces for this identity"
            } else {
                "Keyspaces refused the query; see the message"
            };
            report.fail("query", &info.message, hint);
        }
        _ => report.fail(
            "query",
            "no answer within 10 s",
            "the connection stalls: check for throttling or network drops",
        ),
    }
}

/// DNS, TCP and TLS, each reported; a step whose input failed is reported as skipped.
async fn network_steps(cli: &Cli, parts: &UpstreamParts, report: &mut Report) -> Reached {
    let Ok(address) = &parts.address else {
        report.skip("DNS", "needs an endpoint");
        report.skip("TCP", "needs DNS");
        report.skip("TLS", "needs TCP");
        return Reached::Nothing;
    };
    let addrs: Vec<_> = match tokio::net::lookup_host(address.as_str()).await {
        Ok(a) => a.collect(),
        Err(e) => {
            report.fail("DNS", &e, "the endpoint name does not resolve: check --endpoint/--region and DNS (VPC endpoints need private DNS)");
            Vec::new()
        }
    };
    if addrs.is_empty() {
        report.skip("TCP", "needs DNS");
        report.skip("TLS", "needs TCP");
        return Reached::Nothing;
    }
    report.pass(
        "DNS",
        format!(
            "{address} → {}",
            addrs
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    // Every address at once: the pool spreads its connections over all of them, so one that
    // does not answer is worth knowing about even when another does.
    let started = Instant::now();
    let timeout = Duration::from_secs(cli.connect_timeout.max(1));
    let attempts = addrs
        .iter()
        .map(|a| tokio::time::timeout(timeout, TcpStream::connect(*a)));
    let results = futures_util::future::join_all(attempts).await;
    let usable = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    let mut first_error = None;
    let mut connected = None;
    for (addr, result) in addrs.iter().zip(results) {
        match result {
            Ok(Ok(t)) if connected.is_none() => connected = Some((*addr, t)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert((e.to_string(), "nothing accepts connections there: check the port (9142), security groups, firewalls and the VPC endpoint"));
            }
            Err(_) => {
                first_error.get_or_insert(("connect timed out".to_owned(), "packets are dropped: allow outbound TCP 9142 (security groups, NACLs, proxies)"));
            }
        }
    }
    let Some((addr, tcp)) = connected else {
        let (e, hint) = first_error.unwrap_or_else(|| ("no address".to_owned(), ""));
        report.fail("TCP", &e, hint);
        report.skip("TLS", "needs TCP");
        return Reached::Nothing;
    };
    report.pass(
        "TCP",
        format!(
            "connected to {addr} in {} ms; {usable} of {} addresses accept connections",
            started.elapsed().as_millis(),
            addrs.len()
        ),
    );
    if cli.insecure_plaintext_upstream_for_benchmarks {
        report.fail(
            "TLS",
            "plaintext upstream (benchmark mode)",
            "drop --insecure-plaintext-upstream-for-benchmarks: Keyspaces is TLS-only",
        );
        return Reached::Tls;
    }
    let (Ok(tls), Ok(name)) = (&parts.tls, &parts.server_name) else {
        report.skip("TLS", "needs the trusted roots and the TLS name");
        return Reached::Nothing;
    };
    match TlsConnector::from(tls.clone())
        .connect(name.clone(), tcp)
        .await
    {
        Ok(tls) => {
            let session = tls.get_ref().1;
            let version = session
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default();
            let root = session
                .peer_certificates()
                .and_then(|chain| crate::upstream::tls::anchor_name(chain, &parts.roots))
                .unwrap_or_else(|| "a trusted root".to_owned());
            report.pass(
                "TLS",
                format!(
                    "{version}, certificate valid for {} and verified against {root}",
                    name.to_str()
                ),
            );
            Reached::Tls
        }
        Err(e) => {
            report.fail("TLS", &e, tls_hint(&e));
            Reached::Nothing
        }
    }
}
