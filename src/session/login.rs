//! Checking a client's credentials: within its source's and username's failed-login budgets,
//! and against the users in force when the verdict is given.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::auth::attempts::loggable;
use crate::auth::client::{Logins, Verdict};
use crate::auth::sessions::session_key;
use crate::context::ProxyContext;
use crate::handshake::{ClientHandshake, Credentials, Step};
use crate::metrics::{metrics, Metrics, Outcome};

/// Checks before the verdict, at most: a reload between two checks is rare, a stream of them
/// must not keep a login spinning.
const CHECKS: usize = 3;

/// The handshake's next step for `creds`. Credentials of a live session were checked lately:
/// they are not a guess, and pass without touching the failure budgets (an application's
/// reconnects cannot be locked out by someone guessing at its username). Otherwise a source or
/// username that has used up its failed-login budget is refused before any hashing or KMS
/// call. A SIGHUP while the client waited or was being checked means a check under the new
/// users: credentials a reload removed or rotated must not get in on a connection opened
/// before it.
pub(super) async fn verify(
    ctx: &ProxyContext,
    hs: &mut ClientHandshake,
    source: IpAddr,
    creds: &Credentials,
) -> Step {
    let user = creds.user.as_str();
    let key = session_key(user, &creds.secret);
    for _ in 0..CHECKS {
        let logins = ctx.logins.load_full();
        if !hs.adopt(&logins) {
            return hs.refused_unchecked(
                creds,
                "client authentication changed while this client logged in; reconnect",
            );
        }
        let verdict = match logins.sessions.touch(&key, Instant::now()) {
            Some(identity) => Verdict::Accepted(identity),
            None => {
                let check = || check(ctx, &logins, source, user, &creds.secret);
                // Boxed: the KMS call's future is large, and inlined it would grow every
                // connection's task (10,000 idle clients: 94 MB → 187 MB) for a moment's use.
                Box::pin(logins.checks.run(key, check)).await
            }
        };
        if !Arc::ptr_eq(&logins, &ctx.logins.load()) {
            continue;
        }
        return match verdict {
            Verdict::Accepted(identity) => hs.verified(creds, Ok(identity)),
            Verdict::Refused(why) => hs.verified(creds, Err(why)),
            Verdict::Throttled(wait) => {
                let why = format!(
                    "too many failed logins for this user or from this address; try again in {} s",
                    wait.as_secs().max(1)
                );
                hs.refused_unchecked(creds, &why)
            }
        };
    }
    hs.refused_unchecked(creds, "client users are being reloaded; try again")
}

/// One check of credentials, within the failure budgets, counted and logged.
async fn check(
    ctx: &ProxyContext,
    logins: &Logins,
    source: IpAddr,
    user: &str,
    secret: &[u8],
) -> Verdict {
    if let Err(wait) = ctx.login_failures.reserve(source, user, Instant::now()) {
        Metrics::count(
            &metrics().client_handshakes,
            Outcome {
                result: "login_rate_limited",
            },
        );
        return Verdict::Throttled(wait);
    }
    match logins.verify(user, secret).await {
        Ok(identity) => {
            ctx.login_failures.succeeded(source, user, Instant::now());
            Verdict::Accepted(identity)
        }
        Err(why) => {
            // Only attempts within the budget get here, which bounds this log line too.
            tracing::warn!(user = %loggable(user), %source, "failed login");
            Verdict::Refused(why)
        }
    }
}
