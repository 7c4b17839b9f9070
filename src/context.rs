//! What the proxy's parts share for the life of the process, built once from the configuration
//! (`config::resolve`) and handed to the accept loop, every session, the reload task and the
//! admin endpoints.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::attempts::LoginFailures;
use crate::auth::client::Logins;
use crate::session::admission::HandshakeSlots;
use crate::session::LastRead;
use crate::shutdown::Shutdown;
use crate::upstream::identity_pools::IdentityPools;
use crate::upstream::pool::Pool;
use crate::upstream::streams::ClientBuffers;
use crate::upstream::UpstreamTarget;

/// What every session shares.
#[derive(Debug)]
pub struct ProxyContext {
    pub upstream: UpstreamTarget,
    /// Swapped on SIGHUP: new handshakes see the reloaded users and an empty session cache;
    /// open connections stay.
    pub logins: arc_swap::ArcSwap<Logins>,
    /// TLS on the client port (`--client-tls-cert`), swapped on SIGHUP to pick up a renewed
    /// certificate; `None` for plaintext.
    pub client_tls: arc_swap::ArcSwapOption<rustls::ServerConfig>,
    /// The address to advertise in `system.local`; by default the one the client dialled.
    pub advertise_address: Option<IpAddr>,
    /// Seeds the host_id `system.local` reports (with the advertised address).
    pub host_id_seed: String,
    pub max_frame_len: usize,
    pub handshake_timeout: Duration,
    /// Requests read from one client ahead of their answers (pooled mode); beyond it the
    /// proxy stops reading that client, which pushes back through TCP.
    pub max_client_in_flight: usize,
    /// Bytes of unwritten answers clients may pin, each and all together, before one is
    /// closed as not reading.
    pub client_buffers: Arc<ClientBuffers>,
    /// Per-identity pools (`--identity-roles`); other clients use `pool`.
    pub identity_pools: Option<Arc<IdentityPools>>,
    /// Shared upstream connections; `None` gives each client its own (debugging mode).
    pub pool: Option<Arc<Pool>>,
    /// Raise consistency levels to what Keyspaces accepts (pooled mode).
    pub consistency_guard: bool,
    /// Connections still in their handshake, in all and per source address.
    pub handshaking: Arc<HandshakeSlots>,
    /// Failed logins per source address and username (`--login-failures-per-*`).
    pub login_failures: Arc<LoginFailures>,
    /// Begun when the proxy starts shutting down: sessions stop reading new requests and close
    /// once their in-flight requests are answered.
    pub shutdown: Shutdown,
    /// Which client read requests last: whether a client's burst is alone on the server
    /// (`session::head_start`).
    pub last_read: LastRead,
}
