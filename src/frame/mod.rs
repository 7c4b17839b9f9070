//! CQL native protocol v3/v4 framing: headers, the envelope codec, compression and the few
//! bodies the proxy reads or writes itself.

pub mod codec;
pub mod compression;
pub mod error_reply;
pub mod header;
pub mod messages;
pub mod request;
pub mod result;
pub mod types;
pub mod validate;
pub mod version;

pub use codec::{ForeignProtocol, Frame, FrameCodec, FrameDecodeError, FrameError};
pub use compression::Compression;
pub use error_reply::ErrorReply;
pub use header::{flags, opcode, Header};
pub use version::ProtocolVersion;
