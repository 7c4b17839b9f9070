//! Per-connection routing decisions once the handshake is done, free of I/O.
//!
//! Most frames are forwarded by header alone. Only system-table statements (to keep drivers on
//! the proxy), OPTIONS and REGISTER (answered locally) and compressed frames that must change
//! algorithm have their bodies touched.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;

use crate::frame::compression::{compressed, decompressed, transcode, CompressionError};
use crate::frame::header::opcode;
use crate::frame::messages::{self, consistency, error_code, message_body};
use crate::frame::request::{parse_execute, parse_prepare, parse_query};
use crate::frame::result::{kind, result_kind, ColumnSpec, Prepared};
use crate::frame::validate::validate_request;
use crate::frame::ProtocolVersion;
use crate::frame::{Compression, ErrorReply, Frame};
use crate::handshake;
use crate::policy::prepared::{PreparedCache, SystemStatement};
use crate::statement::guard_consistency;
use crate::topology::{classify, rewrite_result, ProxyNode, SystemTable};
use crate::use_statement::{classify_use, UseStatement};

/// At most this many system-table prepared statements are remembered per connection.
const MAX_SYSTEM_PREPARED: usize = 256;

#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Upstream(Frame),
    Client(Frame),
    /// Tell the client why, then close this connection only.
    Close(Frame),
    /// `USE keyspace`: switch this client to the upstream connections of that keyspace, then
    /// send the statement there (pooled mode; a shared connection's keyspace never changes).
    Use {
        keyspace: String,
        frame: Frame,
    },
}

#[derive(Debug)]
enum Pending {
    Rewrite(SystemTable, Option<Vec<ColumnSpec>>),
    Prepare(SystemTable),
}

#[derive(Debug)]
pub struct Router {
    version: ProtocolVersion,
    client_compression: Compression,
    upstream_compression: Compression,
    node: ProxyNode,
    max_frame_len: usize,
    pending: HashMap<i16, Pending>,
    system_prepared: HashMap<Bytes, (SystemTable, Option<Vec<ColumnSpec>>)>,
    split_use: bool,
    /// The keyspace this client's last exact `USE` named (pooled mode), for unqualified
    /// system-table names after `USE system`.
    keyspace: Option<String>,
    consistency_guard: Option<Arc<PreparedCache>>,
    /// The pool-wide prepared statements (pooled mode): an EXECUTE is classified by what its id
    /// stands for, whichever client connection prepared it.
    prepared: Option<Arc<PreparedCache>>,
    /// The ids this connection executed last, and what the pool said of them: a client runs
    /// a few statements over and over, and the pool's map costs a lock and a SipHash each time
    /// (~2% of the proxy's CPU). A stale entry after the pool evicted the id only means the
    /// EXECUTE goes upstream, whose UNPREPARED the driver handles.
    recent: RecentStatements,
}

const RECENT_STATEMENTS: usize = 4;

#[derive(Debug, Default)]
struct RecentStatements {
    slots: [Option<(Bytes, Option<SystemStatement>)>; RECENT_STATEMENTS],
    next: usize,
}

impl RecentStatements {
    fn get(&self, id: &[u8]) -> Option<&Option<SystemStatement>> {
        self.slots
            .iter()
            .flatten()
            .find(|(known, _)| known.as_ref() == id)
            .map(|(_, system)| system)
    }

    fn remember(&mut self, id: &[u8], system: Option<SystemStatement>) {
        self.slots[self.next] = Some((Bytes::copy_from_slice(id), system));
        self.next = (self.next + 1) % RECENT_STATEMENTS;
    }
}

impl Router {
    pub fn new(
        version: ProtocolVersion,
        client_compression: Compression,
        upstream_compression: Compression,
        proxy_address: IpAddr,
        max_frame_len: usize,
    ) -> Self {
        Router {
            version,
            client_compression,
            upstream_compression,
            node: proxy_address.into(),
            max_frame_len,
            pending: HashMap::new(),
            system_prepared: HashMap::new(),
            split_use: false,
            keyspace: None,
            consistency_guard: None,
            prepared: None,
            recent: RecentStatements::default(),
        }
    }

    /// The seed of the proxy's host_id in system.local (see `topology::ProxyNode`).
    pub fn host_id_seed(mut self, seed: &str) -> Self {
        self.node = ProxyNode::new(self.node.address, seed);
        self
    }

    /// Report `USE` statements as `Route::Use` instead of forwarding them (pooled mode).
    pub fn split_use(mut self, on: bool) -> Self {
        self.split_use = on;
        self
    }

    /// Classify EXECUTEs by the statements prepared anywhere in the pool; an id the pool does
    /// not know is answered UNPREPARED, so the driver prepares it again through the proxy
    /// (after a proxy restart, on another replica, after eviction) instead of its answer going
    /// unexamined: a system-table read would otherwise reach the client unrewritten.
    pub fn prepared(mut self, prepared: Option<Arc<PreparedCache>>) -> Self {
        self.prepared = prepared;
        self
    }

    /// Raise consistency levels to what Keyspaces accepts, using `prepared` to tell prepared
    /// writes from reads.
    pub fn consistency_guard(mut self, prepared: Option<Arc<PreparedCache>>) -> Self {
        self.consistency_guard = prepared;
        self
    }

    fn protocol_error(&self, stream: i16, message: &str) -> Frame {
        ErrorReply::protocol(message.to_owned()).frame(self.version, stream)
    }

    pub fn on_client_frame(&mut self, frame: Frame) -> Route {
        let h = frame.header;
        if h.is_response() || h.version() != Some(self.version) {
            return Route::Close(self.protocol_error(
                h.stream,
                &format!(
                    "Invalid message: version {} {} on a {} connection",
                    h.protocol_version(),
                    if h.is_response() {
                        "response"
                    } else {
                        "request"
                    },
                    self.version
                ),
            ));
        }
        if h.stream < 0 {
            // Negative ids are the server's, for events: an answer there would never reach the
            // request, and the client would wait for it for ever.
            return Route::Client(self.protocol_error(
                h.stream,
                &format!(
                    "Invalid stream id {}: negative ids are reserved for server events",
                    h.stream
                ),
            ));
        }
        match h.opcode {
            opcode::STARTUP | opcode::AUTH_RESPONSE => Route::Client(self.protocol_error(
                h.stream,
                &format!(
                    "Unexpected message {}, the connection is already started",
                    opcode::name(h.opcode)
                ),
            )),
            op if !opcode::is_request(op) => Route::Close(self.protocol_error(
                h.stream,
                &format!("Unknown or unexpected opcode 0x{op:02x}"),
            )),
            _ => match self.checked(frame) {
                Ok(plain) => self.route_checked(plain),
                Err(refusal) => refusal,
            },
        }
    }

    fn route_checked(&mut self, plain: Frame) -> Route {
        let stream = plain.stream();
        match plain.opcode() {
            opcode::OPTIONS => Route::Client(handshake::supported(self.version, stream)),
            // Events from Keyspaces are never relayed (the topology they describe is not the
            // client's), so registering is acknowledged and ends there.
            opcode::REGISTER => Route::Client(messages::ready(self.version, stream)),
            opcode::QUERY | opcode::PREPARE | opcode::EXECUTE => self.inspect_request(plain),
            opcode::BATCH if self.consistency_guard.is_some() => self.inspect_request(plain),
            _ => Route::Upstream(compressed(plain, self.upstream_compression)),
        }
    }

    /// The request decompressed and checked for structure (see `frame::validate`): a body the
    /// upstream could not decode would make it close a connection other clients share, so it
    /// is answered here, on its own stream, and goes no further.
    fn checked(&self, frame: Frame) -> Result<Frame, Route> {
        let stream = frame.stream();
        let plain = decompressed(frame, self.client_compression, self.max_frame_len)
            .map_err(|e| Route::Close(self.compression_error(stream, &e)))?;
        let op = plain.opcode();
        message_body(&plain.header, &plain.body)
            .and_then(|body| validate_request(self.version, op, body))
            .map_err(|e| {
                Route::Client(self.protocol_error(
                    stream,
                    &format!("Invalid {} message: {e}", opcode::name(op)),
                ))
            })?;
        Ok(plain)
    }

    fn compression_error(&self, stream: i16, e: &CompressionError) -> Frame {
        self.protocol_error(stream, &format!("Invalid compressed frame: {e}"))
    }

    fn inspect_request(&mut self, plain: Frame) -> Route {
        let stream = plain.stream();
        if self.split_use {
            if let Some(route) = self.route_use(stream, &plain) {
                return route;
            }
        }
        let executed = if plain.opcode() == opcode::EXECUTE {
            match self.execute_pending(stream, &plain) {
                Ok(pending) => pending,
                Err(unknown) => return unknown,
            }
        } else {
            None
        };
        let plain = match &self.consistency_guard {
            Some(cache) => guard_consistency(plain, cache),
            None => plain,
        };
        let pending = match (plain.opcode(), message_body(&plain.header, &plain.body)) {
            (opcode::EXECUTE, _) => executed,
            (opcode::QUERY, Ok(body)) => parse_query(body)
                .ok()
                .and_then(|q| classify(q.text, self.keyspace.as_deref()))
                .map(|t| Pending::Rewrite(t, None)),
            (opcode::PREPARE, Ok(body)) => parse_prepare(body)
                .ok()
                .and_then(|text| classify(text, self.keyspace.as_deref()))
                .map(Pending::Prepare),
            _ => None,
        };
        match pending {
            Some(p) => {
                self.pending.insert(stream, p);
            }
            None => self.forget(stream),
        }
        Route::Upstream(compressed(plain, self.upstream_compression))
    }

    /// A `USE` on a shared connection would switch the keyspace of every client pinned there:
    /// an exact one becomes [`Route::Use`], any other statement starting with `USE` is refused,
    /// and so is preparing one (its EXECUTE would be the same statement by another name).
    fn route_use(&mut self, stream: i16, plain: &Frame) -> Option<Route> {
        let op = plain.opcode();
        if op != opcode::QUERY && op != opcode::PREPARE {
            return None;
        }
        let body = message_body(&plain.header, &plain.body).ok()?;
        // The consistency, for a QUERY: a USE that is routed keeps it.
        let (text, cl) = if op == opcode::QUERY {
            let q = parse_query(body).ok()?;
            (q.text, q.consistency)
        } else {
            (parse_prepare(body).ok()?, consistency::ONE)
        };
        let refuse = |why: &str| {
            Some(Route::Client(
                ErrorReply::verbatim(error_code::INVALID, why.to_owned())
                    .frame(self.version, stream),
            ))
        };
        match (classify_use(text), op) {
            (UseStatement::NotUse, _) => None,
            (UseStatement::Use(keyspace), opcode::QUERY) => {
                self.forget(stream);
                self.keyspace = Some(keyspace.clone());
                // The canonical spelling goes upstream, not the client's: the proxy decided
                // what it means, and a server need not parse comments the way it did.
                let canonical = format!("USE \"{}\"", keyspace.replace('"', "\"\""));
                let frame = messages::query(self.version, stream, &canonical, cl);
                Some(Route::Use {
                    keyspace,
                    frame: compressed(frame, self.upstream_compression),
                })
            }
            (UseStatement::Use(_), _) => refuse(
                "USE cannot be prepared through keyspaces-proxy (its upstream connections are \
                 shared): send it as a simple statement",
            ),
            (UseStatement::Unparsable, _) => refuse(
                "keyspaces-proxy accepts USE only as `USE keyspace` or `USE \"Keyspace\"`, \
                 optionally followed by `;` and comments",
            ),
        }
    }

    /// The rewrite an EXECUTE's answer needs, known from this connection's system statements
    /// or the pool's (pooled mode), whichever client connection prepared it; UNPREPARED for an
    /// id the pool has not seen prepared.
    fn execute_pending(&mut self, stream: i16, plain: &Frame) -> Result<Option<Pending>, Route> {
        let Some(id) = message_body(&plain.header, &plain.body)
            .and_then(parse_execute)
            .ok()
            .map(|e| e.id)
        else {
            return Ok(None);
        };
        // Almost always empty: skip hashing the id for ordinary traffic.
        if !self.system_prepared.is_empty() {
            if let Some((table, cols)) = self.system_prepared.get(id) {
                return Ok(Some(Pending::Rewrite(*table, cols.clone())));
            }
        }
        let Some(cache) = self.prepared.as_ref() else {
            return Ok(None);
        };
        let rewrite = |system: &Option<SystemStatement>| {
            system
                .as_ref()
                .map(|(table, cols)| Pending::Rewrite(*table, cols.as_deref().map(<[_]>::to_vec)))
        };
        if let Some(system) = self.recent.get(id) {
            return Ok(rewrite(system));
        }
        match cache.system_of(id) {
            Some(system) => {
                let pending = rewrite(&system);
                self.recent.remember(id, system);
                Ok(pending)
            }
            None => Err(Route::Client(
                ErrorReply::unprepared(id).frame(self.version, stream),
            )),
        }
    }

    fn forget(&mut self, stream: i16) {
        if !self.pending.is_empty() {
            self.pending.remove(&stream);
        }
    }

    /// A frame from the upstream, translated for the client; `None` to drop it.
    pub fn on_upstream_frame(&mut self, frame: Frame) -> Result<Option<Frame>, CompressionError> {
        if frame.stream() < 0 {
            return Ok(None);
        }
        // Almost always empty: skip hashing the stream id for ordinary traffic.
        let pending = match self.pending.is_empty() {
            true => None,
            false => self.pending.remove(&frame.stream()),
        };
        let Some(pending) = pending else {
            return transcode(
                frame,
                self.upstream_compression,
                self.client_compression,
                self.max_frame_len,
            )
            .map(Some);
        };
        let plain = decompressed(frame, self.upstream_compression, self.max_frame_len)?;
        if plain.opcode() != opcode::RESULT {
            return Ok(Some(compressed(plain, self.client_compression)));
        }
        let out = match pending {
            Pending::Rewrite(table, cols) => {
                match rewrite_result(
                    &plain.header,
                    &plain.body,
                    table,
                    cols.as_deref(),
                    self.node,
                ) {
                    Ok(body) => Frame::new(plain.header, body),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not rewrite a system table result; passing it on");
                        plain
                    }
                }
            }
            Pending::Prepare(table) => {
                self.remember_prepared(&plain, table);
                plain
            }
        };
        Ok(Some(compressed(out, self.client_compression)))
    }

    fn remember_prepared(&mut self, frame: &Frame, table: SystemTable) {
        let Ok(body) = message_body(&frame.header, &frame.body) else {
            return;
        };
        if result_kind(body).ok() != Some(kind::PREPARED) {
            return;
        }
        if let Ok(p) = Prepared::parse(body, self.version) {
            if self.system_prepared.len() >= MAX_SYSTEM_PREPARED {
                self.system_prepared.clear();
            }
            self.system_prepared.insert(p.id, (table, p.result_columns));
        }
    }
}

#[cfg(test)]
mod tests;
