//! What a newcomer meets first, run as the real binary: mistakes refused with a message that
//! names the cause and the fix, said once, without colour codes in a file, and `check` going on
//! past a failed step. The AWS chain is pinned to static values or to nothing at all.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs the binary with a clean environment: no credentials unless `with_keys`, no profile,
/// instance metadata off.
fn run(args: &[&str], with_keys: bool, aws_file: &Path) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyspaces-proxy"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", aws_file)
        .env("AWS_SHARED_CREDENTIALS_FILE", aws_file);
    if with_keys {
        cmd.env("AWS_ACCESS_KEY_ID", "AKIDFIRSTRUN")
            .env("AWS_SECRET_ACCESS_KEY", "first-run-secret");
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("the binary runs");
    Run {
        ok: status.success(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

fn aws_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("aws-empty");
    std::fs::write(&p, "").unwrap();
    p
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn check_reports_every_step_that_does_not_depend_on_a_failed_one() {
    let dir = tempfile::tempdir().unwrap();
    let aws = aws_file(dir.path());
    let endpoint = format!("127.0.0.1:{}", closed_port());
    // No credentials at all and nothing listening: both problems in one run.
    let out = run(
        &["check", "--region", "us-east-1", "--endpoint", &endpoint],
        false,
        &aws,
    );
    assert!(!out.ok);
    let s = &out.stdout;
    assert!(s.contains("✔ configuration:"), "{s}");
    assert!(s.contains("✘ credentials:"), "{s}");
    assert!(s.contains("✔ DNS:"), "{s}");
    assert!(s.contains("✘ TCP:"), "{s}");
    assert!(s.contains("– TLS: skipped"), "{s}");
    assert!(s.contains("– authentication: skipped"), "{s}");
    assert!(s.contains("– query: skipped"), "{s}");

    // A broken region stops only what is derived from it: credentials are still checked.
    let out = run(&["check", "--region", "us-east1"], true, &aws);
    assert!(!out.ok);
    let s = &out.stdout;
    assert!(
        s.contains("✘ configuration: region \"us-east1\"") && s.contains("did you mean us-east-1?"),
        "{s}"
    );
    assert!(s.contains("✔ credentials: access key AKIDFIRS"), "{s}");
    assert!(s.contains("– DNS: skipped"), "{s}");
    assert_eq!(s.matches("✘").count(), 1, "one problem, said once:\n{s}");
}

#[test]
fn check_lists_only_its_own_flags() {
    let dir = tempfile::tempdir().unwrap();
    let aws = aws_file(dir.path());
    let help = run(&["check", "--help"], false, &aws).stdout;
    assert!(
        help.contains("--region") && help.contains("--ca-file"),
        "{help}"
    );
    for server_only in [
        "--listen",
        "--drain-timeout",
        "--print-config",
        "--kmsauth-to",
    ] {
        assert!(!help.contains(server_only), "{server_only} in:\n{help}");
    }
    // A server command line with `check` added still parses: what check does not read is
    // accepted and ignored.
    let out = run(
        &["check", "--listen", "127.0.0.1:1", "--region", "us-east1"],
        true,
        &aws,
    );
    assert!(
        out.stdout.contains("✘ configuration: region"),
        "{}",
        out.stderr
    );
    let help = run(&["probe", "--help"], false, &aws).stdout;
    assert!(
        help.contains("--metrics-listen") && !help.contains("--region"),
        "{help}"
    );
    // The main help groups its flags, the commonest first.
    let help = run(&["--help"], false, &aws).stdout;
    let at = |s: &str| help.find(s).unwrap_or_else(|| panic!("{s} missing"));
    assert!(at("Upstream and AWS:") < at("Clients and authentication:"));
    assert!(
        at("--role-arn") < at("--kmsauth-to"),
        "--role-arn comes first"
    );
    assert!(at("Operations:") < at("Benchmarks only:"));
}

#[test]
fn newcomer_mistakes_are_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let aws = aws_file(dir.path());
    let users = dir.path().join("users.txt");
    std::fs::write(&users, "app:secret\n").unwrap();
    let users = users.to_str().unwrap();

    let out = run(
        &["--region", "us-east-1", "--client-credentials-file", users],
        true,
        &aws,
    );
    assert!(
        !out.ok,
        "a credentials file without password auth is refused"
    );
    assert!(
        out.stderr.contains("--client-credentials-file (or ")
            && out.stderr.contains("is set but --client-auth is none")
            && out.stderr.contains("add --client-auth password"),
        "{}",
        out.stderr
    );

    let out = run(&["--region", "us-east1"], true, &aws);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("region \"us-east1\" (from --region or KEYSPACES_PROXY_REGION) is not an AWS region name")
            && out.stderr.contains("did you mean us-east-1?"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains('\u{1b}'),
        "no colour codes when stderr is not a terminal: {:?}",
        out.stderr
    );

    let out = run(&[], true, &aws);
    assert!(!out.ok);
    assert_eq!(
        out.stderr.lines().count(),
        1,
        "no region: one line:\n{}",
        out.stderr
    );
    assert!(out.stderr.contains("pass --region"), "{}", out.stderr);
}

#[test]
fn a_taken_port_is_named_once_with_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let aws = aws_file(dir.path());
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(
        &[
            "--region",
            "us-east-1",
            "--endpoint",
            "127.0.0.1:9",
            "--listen",
            &addr,
        ],
        true,
        &aws,
    );
    assert!(!out.ok);
    let wanted = format!("cannot listen on {addr} (--listen): the address is already in use");
    assert_eq!(
        out.stderr.matches(&wanted).count(),
        1,
        "said once:\n{}",
        out.stderr
    );
    assert_eq!(
        out.stderr.matches("already in use").count(),
        1,
        "{}",
        out.stderr
    );
}

/// A log reader that goes away (a crashed log shipper) must not take the process with it:
/// every later log line fails to write, and SIGTERM must still drain and exit.
#[cfg(unix)]
#[test]
fn a_closed_stderr_does_not_stop_signals_from_working() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let aws = aws_file(dir.path());
    let closed = format!("127.0.0.1:{}", closed_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyspaces-proxy"))
        .args([
            "--region",
            "us-east-1",
            "--endpoint",
            &closed,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .env_clear()
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ACCESS_KEY_ID", "AKIDFIRSTRUN")
        .env("AWS_SECRET_ACCESS_KEY", "first-run-secret")
        .env("AWS_CONFIG_FILE", &aws)
        .env("AWS_SHARED_CREDENTIALS_FILE", &aws)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "no listening line"
        );
    }
    // From here every log line fails to write, the signal handler's own first.
    drop(stderr);
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("SIGTERM did not stop the proxy once its stderr was closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}
