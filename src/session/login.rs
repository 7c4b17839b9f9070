//! Checking a client's credentials: within its source's and username's failed-login budgets,
//! and against the users in force when the verdict is given.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use super::ProxyContext;
use crate::auth::attempts::loggable;
use crate::handshake::{ClientHandshake, Credentials, Step};
use crate::metrics::{metrics, Metrics};

/// Checks before the verdict, at most: a reload between two checks is rare, a stream of them
/// must not keep a login spinning.
const CHECKS: usize = 3;

/// The handshake's next step for `creds`. A source or username that has used up its
/// failed-login budget is refused before any hashing or KMS call. A SIGHUP while the client
/// waited or was being checked means a check under the new users: credentials a reload
/// removed or rotated must not get in on a connection opened before it.
pub(super) async fn verify(
    ctx: &ProxyContext,
    hs: &mut ClientHandshake,
    source: IpAddr,
    creds: &Credentials,
) -> Step {
    let user = creds.user.as_str();
    if let Err(wait) = ctx.login_failures.reserve(source, user, Instant::now()) {
        Metrics::count(
            &metrics().client_handshakes,
            vec![("result", "login_rate_limited")],
        );
        let why = format!(
            "too many failed logins for this user or from this address; try again in {} s",
            wait.as_secs().max(1)
        );
        return hs.refused_unchecked(creds, &why);
    }
    for _ in 0..CHECKS {
        let logins = ctx.logins.load_full();
        if !hs.adopt(&logins) {
            // Not the client's fault: its budget is given back.
            ctx.login_failures.succeeded(source, user, Instant::now());
            return hs.refused_unchecked(
                creds,
                "client authentication changed while this client logged in; reconnect",
            );
        }
        // Boxed: the KMS call's future is large, and inlined it would grow every connection's
        // task (10,000 idle clients: 94 MB → 187 MB) for a moment's use.
        let outcome = Box::pin(logins.verify(user, &creds.secret)).await;
        if !Arc::ptr_eq(&logins, &ctx.logins.load()) {
            continue;
        }
        match &outcome {
            Ok(_) => ctx.login_failures.succeeded(source, user, Instant::now()),
            // Only attempts within the budget get here, which bounds this log line too.
            Err(_) => tracing::warn!(user = %loggable(user), %source, "failed login"),
        }
        return hs.verified(creds, outcome);
    }
    ctx.login_failures.succeeded(source, user, Instant::now());
    hs.refused_unchecked(creds, "client users are being reloaded; try again")
}
