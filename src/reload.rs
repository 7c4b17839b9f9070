//! Reloading what may change while clients stay connected: client users, identity roles and
//! their policy, the client TLS certificate — on SIGHUP, and when one of those files changes on
//! disk (a rotated Kubernetes Secret is a symlink swap, and distroless images have no shell to
//! send a signal from). SIGHUP also reloads AWS credentials. A part that fails to load keeps
//! its previous value; open connections are never touched.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::auth::client::Logins;
use crate::auth::credentials::CredentialCache;
use crate::auth::identity_roles::IdentityRoles;
use crate::config::Cli;
use crate::context::ProxyContext;

/// Changes closer together than this are one reload: an editor's save, a Secret's swap.
const SETTLE: Duration = Duration::from_millis(300);

/// How often the watched files are compared with what was loaded, whatever the watches saw.
const POLL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Signal,
    FileChange,
}

impl Cause {
    fn name(self) -> &'static str {
        match self {
            Cause::Signal => "SIGHUP",
            Cause::FileChange => "file change",
        }
    }
}

/// Starts reloading on SIGHUP and on changes to the files `cli` names.
pub(crate) fn spawn(
    cli: &Cli,
    argv: Vec<OsString>,
    ctx: Arc<ProxyContext>,
    credentials: Option<Arc<CredentialCache>>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Cause>();
    listen_for_sighup(tx.clone());
    let watched = watched_files(cli);
    let watcher = watch_files(&watched, tx);
    tokio::spawn(async move {
        // Kept alive with the task: dropping the watcher stops it.
        let _watcher = watcher;
        let mut seen = fingerprints(&watched);
        // Also a look every POLL: a watch follows a directory's inode, so a directory replaced
        // as a whole (mv new old) is never seen by it.
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                cause = rx.recv() => match cause {
                    Some(c) => c,
                    None => return,
                },
                _ = poll.tick(), if !watched.is_empty() => Cause::FileChange,
            };
            // A burst is one reload (a signal in it wins); the window is fixed, so a steady
            // trickle of events cannot put the reload off for ever.
            let mut cause = first;
            tokio::time::sleep(SETTLE).await;
            while let Ok(more) = rx.try_recv() {
                if more == Cause::Signal {
                    cause = Cause::Signal;
                }
            }
            if cause == Cause::FileChange {
                let now = fingerprints(&watched);
                if now == seen {
                    continue; // something else in those directories changed
                }
                seen = now;
            } else {
                seen = fingerprints(&watched);
            }
            reload(&argv, &ctx, cause).await;
            if let (Cause::Signal, Some(c)) = (cause, &credentials) {
                match c.reload().await {
                    Ok(k) => tracing::info!(
                        access_key_id = k.access_key_id(),
                        "SIGHUP: AWS credentials reloaded"
                    ),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: credential reload failed"),
                }
            }
        }
    });
}

fn listen_for_sighup(tx: mpsc::UnboundedSender<Cause>) {
    // Installed now, like the stop signals: SIGHUP's default action would end the process.
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot handle SIGHUP: reloading on a signal is unavailable");
            return;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if tx.send(Cause::Signal).is_err() {
                    return;
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = tx;
}

/// The files a reload re-reads, as named at startup.
fn watched_files(cli: &Cli) -> Vec<PathBuf> {
    [
        &cli.config,
        &cli.client_credentials_file,
        &cli.identity_roles,
        &cli.client_tls_cert,
        &cli.client_tls_key,
        &cli.client_ca,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect()
}

/// Whether an event at `path` may have changed one of `files`: the file itself, where a
/// symlinked one points, or a Secret volume's `..data` symlink. (Other files in the same
/// directories — a log file, say — must not keep asking for reloads.)
fn concerns(path: &Path, files: &[PathBuf], targets: &[PathBuf]) -> bool {
    files.iter().chain(targets).any(|f| f == path)
        || path.file_name().is_some_and(|n| n == "..data")
}

/// Watches the directories holding `files` and, for symlinks, their targets (a Secret volume
/// replaces its `..data` symlink, so the files themselves never see an event).
fn watch_files(
    files: &[PathBuf],
    tx: mpsc::UnboundedSender<Cause>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    if files.is_empty() {
        return None;
    }
    let targets: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| std::fs::canonicalize(f).ok())
        .collect();
    let (names, pointed) = (files.to_vec(), targets.clone());
    let handler = move |event: notify::Result<notify::Event>| {
        let relevant = event.is_ok_and(|e| e.paths.iter().any(|p| concerns(p, &names, &pointed)));
        if relevant {
            let _ = tx.send(Cause::FileChange);
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch files; changes are picked up on SIGHUP only");
            return None;
        }
    };
    let mut dirs: Vec<&Path> = files
        .iter()
        .chain(&targets)
        .map(|f| {
            f.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a directory; its files reload on SIGHUP only");
        }
    }
    Some(watcher)
}

/// What each file holds now (a digest; `None` if unreadable), to tell a change from noise.
fn fingerprints(files: &[PathBuf]) -> HashMap<PathBuf, Option<[u8; 32]>> {
    files
        .iter()
        .map(|f| {
            let digest = std::fs::read(f).ok().map(|b| Sha256::digest(&b).into());
            (f.clone(), digest)
        })
        .collect()
}

/// Re-reads the configuration (file, environment, flags) and applies it.
async fn reload(argv: &[OsString], ctx: &ProxyContext, cause: Cause) {
    let why = cause.name();
    // The error is rendered at once: the boxed one is not Send across the awaits below.
    match Cli::parse_with_config(argv.to_vec()).map_err(|e| e.to_string()) {
        Ok(cli) => reload_clients(ctx, &cli, why).await,
        Err(e) => {
            tracing::error!(cause = why, error = %e, "configuration invalid; nothing reloaded")
        }
    }
}

/// Applies a re-read configuration's identity roles and client users; a part that fails to
/// load keeps its previous value.
async fn reload_clients(ctx: &ProxyContext, cli: &Cli, why: &'static str) {
    if ctx.identity_pools.is_none() && cli.identity_roles.is_some() {
        // Pools per identity need STS and a pooled upstream set up at start: fail loudly
        // rather than let the operator believe the mapping (and its deny policy) applies.
        tracing::error!(
            cause = why,
            "--identity-roles was added to the configuration: it takes a restart; until then \
             every client acts with the proxy's own credentials"
        );
    }
    if let Some(pools) = &ctx.identity_pools {
        // Tightening the policy must take effect: a stale proxy-credentials would fail open.
        pools.set_denies_unmapped(
            cli.unmapped_identities == crate::config::UnmappedIdentities::Deny,
        );
        let kmsauth = cli.client_auth == crate::config::ClientAuthMode::Kmsauth;
        let load = |path: &Path| {
            IdentityRoles::load(path).and_then(|roles| {
                if kmsauth {
                    roles.check_kmsauth_names()?;
                }
                Ok(roles)
            })
        };
        match cli.identity_roles.as_deref().map(load) {
            Some(Ok(roles)) => {
                pools.replace_roles(roles).await;
                tracing::info!(cause = why, "identity roles reloaded");
            }
            Some(Err(e)) => {
                tracing::error!(cause = why, error = %e, "keeping the previous identity roles")
            }
            None => pools.replace_roles(IdentityRoles::default()).await,
        }
    }
    if ctx.client_tls.load().is_some() {
        // A renewed certificate (cert-manager, a rotated Secret) is picked up here; turning
        // TLS on or off changes what clients must do, and takes a restart.
        match cli.client_tls() {
            Ok(Some(tls)) => {
                ctx.client_tls.store(Some(tls));
                tracing::info!(cause = why, "client TLS certificate reloaded");
            }
            Ok(None) => tracing::error!(
                cause = why,
                "--client-tls-cert is gone from the configuration; TLS stays on until a restart"
            ),
            Err(e) => tracing::error!(cause = why, error = %e, "keeping the previous client TLS"),
        }
    }
    match cli.client_auth().await {
        Ok(auth) => {
            // Sessions vouched for by the old users are checked again, except where the user's
            // entry (or the kmsauth settings) did not change.
            let next = Logins::new(auth, cli.session_cache());
            let previous = ctx.logins.load_full();
            previous.sessions.carry_over(
                &next.sessions,
                |identity| previous.still_vouches(&next, identity),
                std::time::Instant::now(),
            );
            ctx.logins.store(Arc::new(next));
            tracing::info!(cause = why, "client authentication reloaded");
        }
        Err(e) => tracing::error!(cause = why, error = %e, "keeping the previous client users"),
    }
}
