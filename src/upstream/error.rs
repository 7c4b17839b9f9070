//! What can go wrong opening an upstream connection, and what a client may be told of it:
//! details that name accounts (ARNs, account ids, SDK text) stay in the log under a reference.

use crate::auth::credentials::CredentialsError;
use crate::frame::messages::{error_code, ErrorInfo};
use crate::frame::ErrorReply;
use crate::frame::FrameDecodeError;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {address} failed: {source}")]
    Tls {
        address: String,
        source: std::io::Error,
    },
    #[error("upstream handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("upstream rejected authentication: {}", .0.message)]
    AuthRejected(ErrorInfo),
    #[error("upstream refused the connection handshake: {}", .0.message)]
    Refused(ErrorInfo),
    #[error("{}", .0.message)]
    UseFailed(ErrorInfo),
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("upstream closed the connection during the handshake")]
    Closed,
    #[error("upstream closed the connection before answering anything")]
    ClosedUnanswered,
}

/// Whether upstream text names an AWS account: an ARN (any case), a 12-digit account id on its
/// own, or one written as three groups of four digits with short separators between them
/// (`1234-5678-9012`, `1234.5678.9012`, `1234 - 5678 - 9012`).
fn names_an_account(text: &str) -> bool {
    if text.to_ascii_lowercase().contains("arn:") {
        return true;
    }
    // Runs of digits, with what separates each from the one before it.
    let mut runs: Vec<(&str, &str)> = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
        let gap = &rest[..start];
        let after = &rest[start..];
        let end = after
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after.len());
        runs.push((gap, &after[..end]));
        rest = &after[end..];
    }
    let separator =
        |gap: &str| !gap.is_empty() && gap.len() <= 3 && !gap.chars().any(|c| c.is_alphanumeric());
    runs.iter().any(|(_, run)| run.len() == 12)
        || runs.windows(3).any(|w| {
            w.iter().all(|(_, run)| run.len() == 4) && separator(w[1].0) && separator(w[2].0)
        })
}

impl UpstreamError {
    /// What a client is told: bad credentials for the proxy's own (drivers then stop retrying
    /// a login that cannot succeed), Keyspaces' own code for a failed USE, else a server error.
    pub fn reply(&self) -> ErrorReply {
        let code = match self {
            UpstreamError::AuthRejected(_) | UpstreamError::Credentials(_) => {
                error_code::BAD_CREDENTIALS
            }
            UpstreamError::UseFailed(info) => info.code,
            _ => error_code::SERVER_ERROR,
        };
        ErrorReply::verbatim(code, self.public_message())
    }

    /// What a client may be told. Credential and IAM failures carry SDK text (role and
    /// principal ARNs, account ids, HTTP bodies): the client gets a short reason and a
    /// reference, and the details are logged under that reference. Network and TLS failures
    /// name only the endpoint and the cause, which the client needs to see.
    pub fn public_message(&self) -> String {
        let withheld = |what: &str| {
            let reference = crate::reference::Reference::new();
            tracing::warn!(%reference, error = %self, "{what}");
            reference
        };
        match self {
            UpstreamError::AuthRejected(info) | UpstreamError::UseFailed(info)
                if !names_an_account(&info.message) =>
            {
                info.message.clone()
            }
            UpstreamError::AuthRejected(_) => {
                let reference = withheld("upstream authentication failed");
                format!(
                    "keyspaces-proxy: Keyspaces did not accept the proxy's AWS credentials \
                     (reference {reference} in the proxy's log)"
                )
            }
            UpstreamError::Credentials(_) => {
                let reference = withheld("AWS credentials unavailable");
                format!(
                    "keyspaces-proxy: could not obtain AWS credentials for this connection \
                     (reference {reference} in the proxy's log)"
                )
            }
            UpstreamError::UseFailed(info) | UpstreamError::Refused(info)
                if names_an_account(&info.message) =>
            {
                let reference = withheld("upstream refused a request the proxy made");
                format!(
                    "keyspaces-proxy: Keyspaces refused the request (reference {reference} in \
                     the proxy's log)"
                )
            }
            other => format!("keyspaces-proxy cannot reach Keyspaces: {other}"),
        }
    }

    /// A bounded label for metrics.
    /// Whether the address that answered is at fault (it broke or stalled the exchange), as
    /// opposed to a verdict on our credentials or request.
    pub fn blames_address(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::Tls { .. }
                | UpstreamError::Timeout(_)
                | UpstreamError::Protocol(_)
                | UpstreamError::Closed
                | UpstreamError::ClosedUnanswered
        )
    }

    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect_error",
            UpstreamError::Tls { .. } => "tls_error",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::AuthRejected(_) => "rejected",
            UpstreamError::Refused(_) | UpstreamError::UseFailed(_) => "refused",
            UpstreamError::Credentials(_) => "credentials_error",
            UpstreamError::Protocol(_) | UpstreamError::Closed => "protocol_error",
            UpstreamError::ClosedUnanswered => "closed_unanswered",
        }
    }
}

impl From<FrameDecodeError> for UpstreamError {
    fn from(e: FrameDecodeError) -> Self {
        UpstreamError::Protocol(e.to_string())
    }
}

#[cfg(test)]
mod public_message_tests {
    use super::*;

    #[test]
    fn clients_never_see_account_ids_or_sdk_text() {
        use crate::frame::messages::ErrorInfo;
        let iam = UpstreamError::AuthRejected(ErrorInfo {
            code: 0x0100,
            message: "User arn:aws:sts::111122223333:assumed-role/orders/x has no permissions."
                .into(),
        });
        let sdk = UpstreamError::Credentials(crate::auth::credentials::CredentialsError(
            "AccessDenied: arn:aws:iam::111122223333:role/orders; request id 5f1c".into(),
        ));
        let startup = UpstreamError::Refused(ErrorInfo {
            code: 0x0000,
            message: "User: arn:aws:iam::999988887777:role/internal is not authorized".into(),
        });
        let keyspace = UpstreamError::UseFailed(ErrorInfo {
            code: 0x2100,
            message: "User 999988887777 may not access keyspace x".into(),
        });
        let shouted = UpstreamError::Refused(ErrorInfo {
            code: 0x0000,
            message: "ARN:AWS:STS::9999-8888-7777:ASSUMED-ROLE/x".into(),
        });
        let spaced = UpstreamError::UseFailed(ErrorInfo {
            code: 0x2100,
            message: "no access in account 9999 8888 7777".into(),
        });
        assert!(!names_an_account(
            "Keyspace orders does not exist (2024-01-15)"
        ));
        assert!(!names_an_account("retry in 1000 ms, 3 of 5"));
        for hidden in [
            "throttled 111122223333 5 times",
            "request at 2024-01-01 111122223333 denied",
            "account 1111.2222.3333 denied",
            "account 1111_2222_3333 denied",
            "account 1111 - 2222 - 3333 denied",
        ] {
            assert!(names_an_account(hidden), "{hidden}");
        }
        for e in [&iam, &sdk, &startup, &keyspace, &shouted, &spaced] {
            let m = e.public_message();
            assert!(!names_an_account(&m), "{m}");
            assert!(m.contains("reference"), "{m}");
        }
        let signature = UpstreamError::AuthRejected(ErrorInfo {
            code: 0x0100,
            message: "Authentication failure: Invalid signature".into(),
        });
        assert_eq!(
            signature.public_message(),
            "Authentication failure: Invalid signature"
        );
    }
}
