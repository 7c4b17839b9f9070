//! `keyspaces-proxy check`: walks the path to Keyspaces one step at a time, printing ✔ or ✘
//! with a hint for each failure, so a broken setup is diagnosed in one command.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{Cli, ConfigError};
use crate::frame::messages::{self, consistency, error_code, ErrorInfo};
use crate::frame::opcode;
use crate::frame::result::Rows;
use crate::upstream::{UpstreamAuth, UpstreamError, UpstreamTarget};

#[derive(Default)]
struct Report {
    failed: bool,
}

impl Report {
    fn pass(&mut self, step: &str, detail: impl std::fmt::Display) {
        println!("✔ {step}: {detail}");
    }

    fn fail(&mut self, step: &str, detail: impl std::fmt::Display, hint: &str) {
        self.failed = true;
        println!("✘ {step}: {detail}");
        println!("    fix: {hint}");
    }

    fn finish(self) -> ExitCode {
        if self.failed {
            println!("Some checks failed.");
            ExitCode::FAILURE
        } else {
            println!("All checks passed.");
            ExitCode::SUCCESS
        }
    }
}

fn config_hint(e: &ConfigError) -> &'static str {
    match e {
        ConfigError::NoRegion => "pass --region (e.g. us-east-1) or set AWS_REGION",
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

pub async fn run(cli: &Cli) -> ExitCode {
    let mut report = Report::default();
    let resolved = match cli.resolve().await {
        Ok(r) => r,
        Err(e) => {
            report.fail("configuration", &e, config_hint(&e));
            return report.finish();
        }
    };
    let target = &resolved.context.upstream;
    report.pass(
        "configuration",
        format!(
            "region {}, endpoint {}, TLS name {}",
            resolved.region.as_deref().unwrap_or("-"),
            target.address,
            target.server_name.to_str()
        ),
    );
    if network_steps(target, &mut report).await.is_none() {
        return report.finish();
    }
    if let UpstreamAuth::SigV4 { credentials, .. } = &target.auth {
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
            }
            Err(e) => {
                report.fail(
                    "credentials",
                    &e,
                    config_hint(&ConfigError::Credentials(e.clone())),
                );
                return report.finish();
            }
        }
    }
    let mut conn = match target.connect(4, Default::default()).await {
        Ok(c) => {
            report.pass(
                "authentication",
                "Keyspaces accepted the handshake (the clock is within its tolerance)",
            );
            c
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
            return report.finish();
        }
        Err(e) => {
            report.fail(
                "authentication",
                &e,
                "see the step above; retry with RUST_LOG=debug for details",
            );
            return report.finish();
        }
    };
    let query = messages::query(4, 1, "SELECT * FROM system.local", consistency::LOCAL_ONE);
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
    report.finish()
}

/// DNS, TCP and TLS, each reported; `None` once one fails.
async fn network_steps(target: &UpstreamTarget, report: &mut Report) -> Option<()> {
    let addrs: Vec<_> = match tokio::net::lookup_host(&target.address).await {
        Ok(a) => a.collect(),
        Err(e) => {
            report.fail("DNS", &e, "the endpoint name does not resolve: check --endpoint/--region and DNS (VPC endpoints need private DNS)");
            return None;
        }
    };
    let Some(addr) = addrs.first().copied() else {
        report.fail("DNS", "no addresses", "check --endpoint");
        return None;
    };
    report.pass(
        "DNS",
        format!(
            "{} → {}",
            target.address,
            addrs
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let started = Instant::now();
    let tcp = match tokio::time::timeout(target.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            report.fail("TCP", &e, "nothing accepts connections there: check the port (9142), security groups, firewalls and the VPC endpoint");
            return None;
        }
        Err(_) => {
            report.fail(
                "TCP",
                "connect timed out",
                "packets are dropped: allow outbound TCP 9142 (security groups, NACLs, proxies)",
            );
            return None;
        }
    };
    report.pass(
        "TCP",
        format!(
            "connected to {addr} in {} ms",
            started.elapsed().as_millis()
        ),
    );
    if target.insecure_plaintext {
        report.fail(
            "TLS",
            "plaintext upstream (benchmark mode)",
            "drop --insecure-plaintext-upstream-for-benchmarks: Keyspaces is TLS-only",
        );
        return Some(());
    }
    match TlsConnector::from(target.tls.clone())
        .connect(target.server_name.clone(), tcp)
        .await
    {
        Ok(tls) => {
            let version = tls
                .get_ref()
                .1
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default();
            report.pass(
                "TLS",
                format!(
                    "{version}, certificate valid for {} and trusted",
                    target.server_name.to_str()
                ),
            );
            Some(())
        }
        Err(e) => {
            report.fail("TLS", &e, tls_hint(&e));
            None
        }
    }
}
