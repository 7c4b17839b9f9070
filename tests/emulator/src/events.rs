//! An event log of what clients did (connections, STARTUP options, auth attempts, queries),
//! as JSON lines in a file and in memory, so tests can assert what the proxy sent. Secrets never
//! enter it: auth events carry the key id and whether a token was present, nothing more.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde_json::Value;

const MEMORY_LIMIT: usize = 200_000;

#[derive(Debug, Default)]
pub struct EventLog {
    enabled: bool,
    file: Mutex<Option<File>>,
    memory: Mutex<Vec<Value>>,
}

impl EventLog {
    pub fn disabled() -> Self {
        EventLog::default()
    }

    pub fn new(path: Option<&Path>) -> std::io::Result<Self> {
        let file = match path {
            Some(p) => Some(File::options().create(true).append(true).open(p)?),
            None => None,
        };
        Ok(EventLog {
            enabled: true,
            file: Mutex::new(file),
            memory: Mutex::new(Vec::new()),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn record(&self, event: Value) {
        if !self.enabled {
            return;
        }
        if let Some(f) = self.file.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            // One write per line: a reader polling the file never sees half an event.
            let _ = f.write_all(format!("{event}\n").as_bytes());
        }
        let mut mem = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        if mem.len() < MEMORY_LIMIT {
            mem.push(event);
        }
    }

    /// Everything recorded so far (in-process tests).
    pub fn snapshot(&self) -> Vec<Value> {
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
