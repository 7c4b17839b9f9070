//! Every ERROR the proxy answers on its own behalf, in one place: which code each kind of
//! failure gets, and the words a client sees. Codes a driver acts on matter more than the text:
//! OVERLOADED and SERVER_ERROR make drivers try another host or retry, BAD_CREDENTIALS ends
//! the login, PROTOCOL_ERROR tells a driver it spoke wrongly (it may downgrade the version).

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

use super::codec::{Frame, FrameError};
use super::messages::{self, error_code, unsupported_version_message};
use super::types::WriteExt;
use super::version::ProtocolVersion;

/// Said before the proxy's own words, so an operator reading a driver's log knows the error
/// came from the proxy and not from Keyspaces.
const PREFIX: &str = "keyspaces-proxy: ";

/// An error the proxy answers itself, in place of an answer from Keyspaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    code: i32,
    message: Cow<'static, str>,
    /// The fields some codes carry after the message (spec §9), already encoded.
    extra: Bytes,
}

impl ErrorReply {
    /// `message` exactly as given: for the words Cassandra itself uses, which drivers and
    /// tools match on.
    pub fn verbatim(code: i32, message: impl Into<Cow<'static, str>>) -> ErrorReply {
        ErrorReply {
            code,
            message: message.into(),
            extra: Bytes::new(),
        }
    }

    /// The proxy's own words, marked as coming from the proxy.
    pub fn proxy(code: i32, why: &str) -> ErrorReply {
        ErrorReply::verbatim(code, format!("{PREFIX}{why}"))
    }

    pub fn protocol(message: impl Into<Cow<'static, str>>) -> ErrorReply {
        ErrorReply::verbatim(error_code::PROTOCOL_ERROR, message)
    }

    /// Refused credentials, in Cassandra's words or the proxy's.
    pub fn bad_credentials(message: impl Into<Cow<'static, str>>) -> ErrorReply {
        ErrorReply::verbatim(error_code::BAD_CREDENTIALS, message)
    }

    /// No upstream capacity for a request now: drivers treat OVERLOADED as retryable on
    /// another host (or the same one, later).
    pub fn unavailable(why: &str) -> ErrorReply {
        ErrorReply::proxy(error_code::OVERLOADED, why)
    }

    /// The connection carrying a request closed before its answer came, and sending it again
    /// was not safe.
    pub fn connection_lost() -> ErrorReply {
        ErrorReply::verbatim(
            error_code::SERVER_ERROR,
            "keyspaces-proxy: the connection to Keyspaces closed before it answered; the request \
             may or may not have been applied",
        )
    }

    /// A statement id the proxy has never seen prepared: the driver prepares it again, as it
    /// would for Keyspaces' own UNPREPARED.
    pub fn unprepared(id: &[u8]) -> ErrorReply {
        let mut extra = BytesMut::with_capacity(2 + id.len());
        extra.put_short_bytes(id);
        ErrorReply {
            extra: extra.freeze(),
            ..ErrorReply::verbatim(
                error_code::UNPREPARED,
                "Prepared query with ID not found: keyspaces-proxy has not seen it prepared; \
                 prepare it again",
            )
        }
    }

    /// Keyspaces kept a request past the request timeout: the client is answered (its driver
    /// would otherwise wait for ever on that stream), and the late answer is dropped.
    pub fn no_answer_within(timeout: std::time::Duration) -> ErrorReply {
        let secs = timeout.as_secs_f32();
        ErrorReply::proxy(
            error_code::SERVER_ERROR,
            &format!("no answer from Keyspaces within {secs} s"),
        )
    }

    /// What a client is told about a frame the decoder refused.
    pub fn undecodable(e: &FrameError) -> ErrorReply {
        match e {
            FrameError::LegacyVersion { version } => {
                ErrorReply::protocol(unsupported_version_message(*version))
            }
            FrameError::TooLarge { .. } | FrameError::Foreign(_) => {
                ErrorReply::protocol(format!("Invalid frame: {e}"))
            }
        }
    }

    #[cfg(test)]
    fn code(&self) -> i32 {
        self.code
    }

    #[cfg(test)]
    fn message(&self) -> &str {
        &self.message
    }

    /// The ERROR frame answering `stream` in protocol `version`.
    pub fn frame(&self, version: ProtocolVersion, stream: i16) -> Frame {
        messages::error_with(version, stream, self.code, &self.message, &self.extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::messages::ErrorInfo;

    fn info(f: &Frame) -> ErrorInfo {
        ErrorInfo::parse(&f.body).unwrap()
    }

    #[test]
    fn the_proxys_words_are_marked_and_cassandras_are_not() {
        let f = ErrorReply::unavailable("no upstream capacity").frame(ProtocolVersion::V4, 9);
        assert_eq!(f.stream(), 9);
        assert_eq!(f.header.protocol_version(), 4);
        let e = info(&f);
        assert_eq!(e.code, error_code::OVERLOADED);
        assert_eq!(e.message, "keyspaces-proxy: no upstream capacity");
        let e = info(&ErrorReply::protocol("Invalid message").frame(ProtocolVersion::V3, 1));
        assert_eq!(e.code, error_code::PROTOCOL_ERROR);
        assert_eq!(e.message, "Invalid message");
    }

    #[test]
    fn a_legacy_version_gets_the_words_drivers_downgrade_on() {
        let r = ErrorReply::undecodable(&FrameError::LegacyVersion { version: 2 });
        assert_eq!(r.code(), error_code::PROTOCOL_ERROR);
        assert_eq!(r.message(), unsupported_version_message(2));
    }
}
