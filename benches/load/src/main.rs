//! keyspaces-load: drives a fixed CQL workload over many pipelined connections and reports
//! throughput and latency percentiles. A lean native-protocol client (no driver overhead), so
//! the system under test, not the client, is what saturates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aws_credential_types::Credentials;
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use keyspaces_proxy::auth::credentials::CredentialCache;
use keyspaces_proxy::frame::messages::{self, consistency, ErrorInfo};
use keyspaces_proxy::frame::result::{kind, result_kind};
use keyspaces_proxy::frame::types::{Reader, WriteExt};
use keyspaces_proxy::frame::ProtocolVersion;
use keyspaces_proxy::frame::{opcode, Frame, FrameCodec, Header};
use keyspaces_proxy::upstream::tls::{client_config, server_name};
use keyspaces_proxy::upstream::{UpstreamAuth, UpstreamTarget};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Workload {
    /// Prepared single-row reads.
    Read,
    /// Prepared single-row writes at LOCAL_QUORUM.
    Write,
    /// `SELECT key FROM system.local` as a simple statement.
    Local,
}

#[derive(Debug, Parser)]
#[command(name = "keyspaces-load", about)]
struct Cli {
    /// HOST:PORT to load (loopback).
    #[arg(long)]
    target: SocketAddr,
    /// Connect with TLS and SigV4 (a direct Keyspaces/emulator client), trusting this CA.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    #[arg(long, default_value = "cassandra.us-east-1.amazonaws.com")]
    tls_server_name: String,
    /// Authenticate with SigV4 over plaintext (to a plaintext emulator, or through an L4 proxy
    /// that adds TLS itself). Loopback only, like every target.
    #[arg(long)]
    sigv4_plaintext: bool,
    /// Open this many idle connections (STARTUP→READY), hold them for --duration, then report.
    #[arg(long, default_value_t = 0)]
    hold_connections: usize,
    /// SigV4 credential AKID:SECRET for --tls-ca and --sigv4-plaintext.
    #[arg(long, default_value = "AKIDEXAMPLE:example-secret")]
    credential: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    #[arg(long, value_enum, default_value = "read")]
    workload: Workload,
    /// Bytes in the value column written by setup and by the write workload.
    #[arg(long, default_value_t = 64)]
    value_size: usize,
    /// Target total requests/s (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Also report the CPU time (over the measured window) and peak RSS of this process: the
    /// proxy or other middlebox under test (Linux /proc).
    #[arg(long)]
    watch_pid: Option<u32>,
    /// Instead of a workload, open and close this many connections one after another and
    /// report the time from TCP connect to READY (or AUTH_SUCCESS with --tls-ca).
    #[arg(long, default_value_t = 0)]
    connect_only: usize,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Conn = Framed<Box<dyn Io>, FrameCodec>;

async fn connect(cli: &Cli) -> Result<Conn, String> {
    if cli.tls_ca.is_some() || cli.sigv4_plaintext {
        let ca = cli.tls_ca.as_deref();
        let (akid, secret) = cli
            .credential
            .split_once(':')
            .ok_or("credential is AKID:SECRET")?;
        let target = UpstreamTarget {
            addresses: std::sync::Arc::new(keyspaces_proxy::upstream::addresses::AddressBook::new(
                &cli.target.to_string(),
            )),
            address: cli.target.to_string(),
            server_name: server_name(&cli.tls_server_name).map_err(|e| e.to_string())?,
            tls: client_config(ca).map_err(|e| e.to_string())?,
            insecure_plaintext: cli.sigv4_plaintext,
            auth: UpstreamAuth::SigV4 {
                credentials: CredentialCache::fixed(Credentials::new(
                    akid, secret, None, None, "load",
                )),
                region: cli.region.clone(),
            },
            connect_timeout: Duration::from_secs(10),
            max_frame_len: 1 << 28,
        };
        let up = target
            .connect(ProtocolVersion::V4, Default::default())
            .await
            .map_err(|e| e.to_string())?;
        let parts = up.framed.into_parts();
        let mut f = Framed::new(
            Box::new(parts.io) as Box<dyn Io>,
            FrameCodec::new(keyspaces_proxy::frame::codec::DEFAULT_MAX_FRAME_LEN),
        );
        f.read_buffer_mut().extend_from_slice(&parts.read_buf);
        Ok(f)
    } else {
        let tcp = TcpStream::connect(cli.target)
            .await
            .map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).ok();
        let mut f = Framed::new(
            Box::new(tcp) as Box<dyn Io>,
            FrameCodec::new(keyspaces_proxy::frame::codec::DEFAULT_MAX_FRAME_LEN),
        );
        let r = call(
            &mut f,
            messages::startup(ProtocolVersion::V4, 0, &[("CQL_VERSION", "3.0.0")]),
        )
        .await?;
        if r.opcode() != opcode::READY {
            return Err(format!(
                "STARTUP answered with {}",
                opcode::name(r.opcode())
            ));
        }
        Ok(f)
    }
}

async fn call(c: &mut Conn, f: Frame) -> Result<Frame, String> {
    c.send(f).await.map_err(|e| e.to_string())?;
    match c.next().await {
        Some(Ok(f)) if f.opcode() == opcode::ERROR => Err(ErrorInfo::parse(&f.body)
            .map(|e| e.message)
            .unwrap_or_default()),
        Some(Ok(f)) => Ok(f),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("connection closed".into()),
    }
}

fn prepared_id(f: &Frame) -> Result<Bytes, String> {
    let mut r = Reader::new(&f.body);
    if result_kind(&f.body).ok() != Some(kind::PREPARED) {
        return Err("not a PREPARED result".into());
    }
    r.i32().ok();
    Ok(Bytes::copy_from_slice(
        r.short_bytes().map_err(|e| e.to_string())?,
    ))
}

/// The body of an EXECUTE binding `values` ([bytes] each).
fn execute_body(id: &[u8], cl: u16, values: &[&[u8]]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_short_bytes(id);
    b.put_u16(cl);
    b.put_u8(0x01 | 0x02); // values, skip metadata
    b.put_u16(values.len() as u16);
    for v in values {
        b.put_bytes_value(Some(v));
    }
    b.freeze()
}

/// Creates the schema and row, and returns the request every worker repeats.
async fn setup(cli: &Cli) -> Result<(u8, Bytes), String> {
    if let Workload::Local = cli.workload {
        let f = messages::query(
            ProtocolVersion::V4,
            0,
            "SELECT key FROM system.local",
            consistency::LOCAL_ONE,
        );
        return Ok((opcode::QUERY, f.body));
    }
    let mut c = connect(cli).await?;
    for q in [
        "CREATE KEYSPACE IF NOT EXISTS load WITH replication = {'class': 'SingleRegionStrategy'}",
        "CREATE TABLE IF NOT EXISTS load.kv (k int PRIMARY KEY, v blob)",
    ] {
        // Re-runs see "already exists"; that is fine.
        let _ = call(
            &mut c,
            messages::query(ProtocolVersion::V4, 0, q, consistency::LOCAL_QUORUM),
        )
        .await;
    }
    let insert = prepared_id(
        &call(
            &mut c,
            messages::prepare(
                ProtocolVersion::V4,
                0,
                "INSERT INTO load.kv (k, v) VALUES (?, ?)",
            ),
        )
        .await?,
    )?;
    let key = 1i32.to_be_bytes();
    let value = vec![0x5a; cli.value_size];
    let write = execute_body(&insert, consistency::LOCAL_QUORUM, &[&key, &value]);
    call(
        &mut c,
        Frame::new(
            Header::request(ProtocolVersion::V4, 0, opcode::EXECUTE),
            write.clone(),
        ),
    )
    .await?;
    match cli.workload {
        Workload::Write => Ok((opcode::EXECUTE, write)),
        _ => {
            let select = prepared_id(
                &call(
                    &mut c,
                    messages::prepare(ProtocolVersion::V4, 0, "SELECT v FROM load.kv WHERE k = ?"),
                )
                .await?,
            )?;
            Ok((
                opcode::EXECUTE,
                execute_body(&select, consistency::LOCAL_ONE, &[&key]),
            ))
        }
    }
}

struct WorkerResult {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
}

async fn worker(
    cli: &Cli,
    op: u8,
    body: Bytes,
    start: Instant,
    measure_from: Instant,
    end: Instant,
) -> Result<WorkerResult, String> {
    let mut c = connect(cli).await?;
    let per_conn_rate = if cli.rate > 0 {
        cli.rate as f64 / cli.connections as f64
    } else {
        0.0
    };
    let mut sent_at = vec![start; cli.concurrency];
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let (mut ok, mut errors, mut issued) = (0u64, 0u64, 0u64);
    let request = |stream: usize| {
        Frame::new(
            Header::request(ProtocolVersion::V4, stream as i16, op),
            body.clone(),
        )
    };
    for (s, at) in sent_at.iter_mut().enumerate() {
        *at = Instant::now();
        c.feed(request(s)).await.map_err(|e| e.to_string())?;
        issued += 1;
    }
    c.flush().await.map_err(|e| e.to_string())?;
    let mut outstanding = cli.concurrency;
    while outstanding > 0 {
        let mut next = c.next().await;
        loop {
            let f = match next {
                Some(Ok(f)) => f,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("connection closed".into()),
            };
            let s = f.stream() as usize;
            let now = Instant::now();
            if now >= measure_from && s < sent_at.len() {
                if f.opcode() == opcode::ERROR {
                    errors += 1;
                } else {
                    ok += 1;
                    hist.saturating_record(now.duration_since(sent_at[s]).as_micros() as u64);
                }
            }
            outstanding -= 1;
            if now < end && s < sent_at.len() {
                if per_conn_rate > 0.0 {
                    let due = start + Duration::from_secs_f64(issued as f64 / per_conn_rate);
                    if due > now {
                        c.flush().await.map_err(|e| e.to_string())?;
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
                sent_at[s] = Instant::now();
                c.feed(request(s)).await.map_err(|e| e.to_string())?;
                issued += 1;
                outstanding += 1;
            }
            // Answer everything already received before paying for a flush.
            match c.next().now_or_never() {
                Some(n) => next = n,
                None => break,
            }
        }
        c.flush().await.map_err(|e| e.to_string())?;
    }
    Ok(WorkerResult { hist, ok, errors })
}

async fn hold_connections(cli: &Cli) {
    let mut held = Vec::with_capacity(cli.hold_connections);
    let mut failed = 0usize;
    let mut first_error = None;
    for _ in 0..cli.hold_connections {
        match connect(cli).await {
            Ok(c) => held.push(c),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({"held": held.len(), "failed": failed, "first_error": first_error})
    );
    tokio::time::sleep(Duration::from_secs_f64(cli.duration)).await;
    drop(held);
}

async fn measure_connects(cli: &Cli) {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut failed = 0;
    for _ in 0..cli.connect_only {
        let t = Instant::now();
        match connect(cli).await {
            Ok(c) => {
                hist.saturating_record(t.elapsed().as_micros() as u64);
                drop(c);
            }
            Err(_) => failed += 1,
        }
    }
    let report = serde_json::json!({
        "target": cli.target.to_string(),
        "tls": cli.tls_ca.is_some(),
        "connects": hist.len(),
        "failed": failed,
        "connect_to_ready_us": {
            "p50": hist.value_at_quantile(0.50),
            "p90": hist.value_at_quantile(0.90),
            "p99": hist.value_at_quantile(0.99),
            "mean": hist.mean().round(),
        },
    });
    println!("{report}");
}

/// User + system CPU seconds `pid` has used, from /proc/PID/stat (in USER_HZ, 100 on Linux).
fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let (utime, stime) = (fields.get(11)?, fields.get(12)?);
    Some((utime.parse::<f64>().ok()? + stime.parse::<f64>().ok()?) / 100.0)
}

/// A `kB` line of /proc/PID/status, such as VmHWM (peak resident set) or VmRSS.
fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if !cli.target.ip().is_loopback() {
        eprintln!("keyspaces-load: only loopback targets are allowed");
        std::process::exit(2);
    }
    if cli.hold_connections > 0 {
        hold_connections(&cli).await;
        return;
    }
    if cli.connect_only > 0 {
        measure_connects(&cli).await;
        return;
    }
    let (op, body) = match setup(&cli).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyspaces-load: setup failed: {e}");
            std::process::exit(1);
        }
    };
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(cli.warmup);
    let end = measure_from + Duration::from_secs_f64(cli.duration);
    let cli = std::sync::Arc::new(cli);
    // The watched process's CPU is read at the edges of the measured window, not around setup.
    let watch = cli.watch_pid.map(|pid| {
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let before = process_cpu_s(pid);
            tokio::time::sleep_until(end.into()).await;
            Some(process_cpu_s(pid)? - before?)
        })
    });
    let tasks: Vec<_> = (0..cli.connections)
        .map(|_| {
            let (cli, body) = (cli.clone(), body.clone());
            tokio::spawn(async move { worker(&cli, op, body, start, measure_from, end).await })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let (mut ok, mut errors, mut failed) = (0, 0, Vec::new());
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => {
                hist.add(&r.hist).ok();
                ok += r.ok;
                errors += r.errors;
            }
            Ok(Err(e)) => failed.push(e),
            Err(e) => failed.push(e.to_string()),
        }
    }
    let secs = cli.duration;
    let process = match (cli.watch_pid, watch) {
        (Some(pid), Some(w)) => {
            let cpu_s = w.await.ok().flatten();
            serde_json::json!({
                "pid": pid,
                "cpu_s": cpu_s,
                "cpu_us_per_request": cpu_s.map(|c| 1e6 * c / (ok + errors).max(1) as f64),
                "peak_rss_kb": status_kb(pid, "VmHWM"),
                "rss_kb": status_kb(pid, "VmRSS"),
            })
        }
        _ => serde_json::Value::Null,
    };
    let report = serde_json::json!({
        "process": process,
        "target": cli.target.to_string(),
        "tls": cli.tls_ca.is_some(),
        "workload": format!("{:?}", cli.workload).to_lowercase(),
        "connections": cli.connections,
        "concurrency": cli.concurrency,
        "duration_s": secs,
        "requests": ok,
        "errors": errors,
        "failed_connections": failed.len(),
        "throughput_rps": (ok as f64 / secs).round(),
        "latency_us": {
            "p50": hist.value_at_quantile(0.50),
            "p90": hist.value_at_quantile(0.90),
            "p99": hist.value_at_quantile(0.99),
            "p999": hist.value_at_quantile(0.999),
            "max": hist.max(),
        },
    });
    println!("{report}");
    if let Some(e) = failed.first() {
        eprintln!(
            "keyspaces-load: {} connection(s) failed, first: {e}",
            failed.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_cpu_and_memory_from_proc() {
        let me = std::process::id();
        assert!(process_cpu_s(me).is_some_and(|s| s >= 0.0));
        assert_eq!(process_cpu_s(u32::MAX), None, "no such process");
        let peak = status_kb(me, "VmHWM").unwrap();
        let now = status_kb(me, "VmRSS").unwrap();
        // The kernel folds RSS into the high-water mark lazily: both are set, not ordered.
        assert!(peak > 0 && now > 0, "peak {peak} kB, now {now} kB");
        assert_eq!(status_kb(me, "NoSuchKey"), None);
    }
}
