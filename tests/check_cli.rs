//! `keyspaces-proxy check` against the emulator: all green, then the right hint for a wrong CA
//! and for wrong credentials. The binary runs as a child process with a pinned, static AWS chain.

mod common;

use std::process::Command;

use common::*;

fn check(args: &[&str], secret: &str, aws: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keyspaces-proxy"))
        .arg("check")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ACCESS_KEY_ID", AKID)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_CONFIG_FILE", aws)
        .env("AWS_SHARED_CREDENTIALS_FILE", aws)
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `check` with `args`, off the async runtime (it runs a process and waits for it).
async fn check_off_runtime(args: Vec<String>, aws: std::path::PathBuf) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        check(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            SECRET,
            &aws,
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_and_explains_failures() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let stranger = emulator(other.path(), |_| {}).await;
    let aws = dir.path().join("aws-empty");
    std::fs::write(&aws, "").unwrap();
    let endpoint = emu.addr.to_string();
    let ca = emu.ca_pem.display().to_string();
    let base = [
        "--region",
        REGION,
        "--endpoint",
        &endpoint,
        "--tls-server-name",
        "cassandra.us-east-1.amazonaws.com",
    ];

    let args: Vec<&str> = base.iter().copied().chain(["--ca-file", &ca]).collect();
    let (ok, out) = tokio::task::spawn_blocking({
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let aws = aws.clone();
        move || {
            check(
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
                SECRET,
                &aws,
            )
        }
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("1 of 1 addresses accept connections"), "{out}");
    for step in [
        "configuration",
        "DNS",
        "TCP",
        "TLS",
        "credentials",
        "authentication",
        "query",
    ] {
        assert!(
            out.contains(&format!("✔ {step}:")),
            "{step} missing in:\n{out}"
        );
    }
    assert!(out.contains("Amazon Keyspaces 3.11.2"), "{out}");
    assert!(
        out.contains("from Environment"),
        "the credential source is named:\n{out}"
    );

    let wrong_ca = stranger.ca_pem.display().to_string();
    let args: Vec<String> = base
        .iter()
        .copied()
        .chain(["--ca-file", &wrong_ca])
        .map(String::from)
        .collect();
    let (ok, out) = check_off_runtime(args, aws.clone()).await;
    assert!(!ok);
    assert!(out.contains("✘ TLS:") && out.contains("--ca-file"), "{out}");

    let args: Vec<String> = base
        .iter()
        .copied()
        .chain(["--ca-file", &ca])
        .map(String::from)
        .collect();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        check(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            "wrong-secret",
            &aws,
        )
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(
        out.contains("✘ authentication: Authentication failure: Invalid signature"),
        "{out}"
    );
    assert!(out.contains("check the secret key"), "{out}");
    drop(stranger);
}

/// Each root Keyspaces documents, as a stand-in with its subject at the top of a chain with an
/// intermediate (as real endpoints serve): the proxy connects, and `check` names the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_root_each_chain_verified_against() {
    use keyspaces_emulator::tls::RootKind;
    let names = [
        "Amazon Root CA 1",
        "Amazon Root CA 2",
        "Amazon Root CA 3",
        "Amazon Root CA 4",
        "Starfield Class 2 Certification Authority",
    ];
    for (kind, name) in RootKind::ALL.into_iter().zip(names) {
        let dir = tempfile::tempdir().unwrap();
        let emu = emulator(dir.path(), |c| c.root = Some(kind)).await;
        let aws = dir.path().join("aws-empty");
        std::fs::write(&aws, "").unwrap();
        let args: Vec<String> = [
            "--region",
            REGION,
            "--endpoint",
            &emu.addr.to_string(),
            "--tls-server-name",
            "cassandra.us-east-1.amazonaws.com",
            "--ca-file",
            &emu.ca_pem.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (ok, out) = check_off_runtime(args, aws).await;
        assert!(ok, "{}: {out}", kind.slug());
        assert!(out.contains(&format!("verified against {name}")), "{out}");
    }
}
