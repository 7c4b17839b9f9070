//! What each prepared statement id stands for, learnt from PREPARE results as they pass, so an
//! upstream connection that answers UNPREPARED can be re-prepared without the client noticing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::frame::result::ColumnSpec;
use crate::topology::SystemTable;

/// The system table a statement reads, and its PREPARED result columns.
pub type SystemStatement = (SystemTable, Option<Arc<[ColumnSpec]>>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedStatement {
    pub query: Arc<str>,
    /// The keyspace in effect when it was prepared (unqualified tables resolve against it).
    pub keyspace: Option<Arc<str>>,
    /// The system table it reads, if any, and then the result columns of its PREPARED answer,
    /// which an EXECUTE with skip_metadata needs for its rows to be rewritten on any client
    /// connection.
    pub system: Option<SystemStatement>,
}

#[derive(Debug)]
pub struct PreparedCache {
    max: usize,
    entries: Mutex<HashMap<Bytes, PreparedStatement>>,
}

impl PreparedCache {
    pub fn new(max: usize) -> PreparedCache {
        PreparedCache {
            max: max.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Bytes, PreparedStatement>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, id: Bytes, statement: PreparedStatement) {
        let mut map = self.lock();
        if map.len() >= self.max && !map.contains_key(&id) {
            // Evict an arbitrary entry: a miss costs one UNPREPARED round trip for the driver,
            // which re-prepares by itself, so precision here is not worth a heavier structure.
            if let Some(k) = map.keys().next().cloned() {
                map.remove(&k);
            }
        }
        map.insert(id, statement);
    }

    pub fn get(&self, id: &[u8]) -> Option<PreparedStatement> {
        self.lock().get(id).cloned()
    }

    /// Whether `id` is known and, if its statement reads a system table, which one. On every
    /// EXECUTE's path, so nothing but that is cloned.
    pub fn system_of(&self, id: &[u8]) -> Option<Option<SystemStatement>> {
        self.lock().get(id).map(|s| s.system.clone())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmt(q: &str) -> PreparedStatement {
        PreparedStatement {
            query: q.into(),
            keyspace: None,
            system: None,
        }
    }

    #[test]
    fn bounded() {
        let c = PreparedCache::new(2);
        c.insert(Bytes::from_static(b"a"), stmt("1"));
        c.insert(Bytes::from_static(b"b"), stmt("2"));
        c.insert(Bytes::from_static(b"c"), stmt("3"));
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(b"c").unwrap().query.as_ref(), "3");
        c.insert(Bytes::from_static(b"c"), stmt("3b"));
        assert_eq!(c.len(), 2);
    }
}
