//! Slots for connections still in their handshake: a total (`--max-handshaking-connections`)
//! and a share per source address (`--max-handshaking-per-source`), so unauthenticated clients
//! cannot take every connection slot, and one address cannot take every handshake slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct HandshakeSlots {
    total: Arc<Semaphore>,
    per_source: usize,
    by_source: Mutex<HashMap<IpAddr, usize>>,
}

/// Which limit a refused connection met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Total,
    Source,
}

/// A handshake slot, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<HandshakeSlots>,
    source: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl HandshakeSlots {
    pub fn new(total: usize, per_source: usize) -> Arc<HandshakeSlots> {
        Arc::new(HandshakeSlots {
            total: Arc::new(Semaphore::new(total.max(1))),
            per_source: per_source.max(1),
            by_source: Mutex::new(HashMap::new()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.by_source.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn try_take(self: &Arc<Self>, source: IpAddr) -> Result<Slot, Full> {
        let mut counts = self.counts();
        let held = counts.entry(source).or_insert(0);
        if *held >= self.per_source {
            return Err(Full::Source);
        }
        let permit = self.total.clone().try_acquire_owned();
        let Ok(permit) = permit else {
            if *held == 0 {
                counts.remove(&source);
            }
            return Err(Full::Total);
        };
        *held += 1;
        Ok(Slot {
            slots: self.clone(),
            source,
            _permit: permit,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.slots.counts();
        if let Some(held) = counts.get_mut(&self.source) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_source_cannot_take_every_slot() {
        let slots = HandshakeSlots::new(4, 2);
        let a1 = slots.try_take(ip(1)).unwrap();
        let _a2 = slots.try_take(ip(1)).unwrap();
        assert_eq!(slots.try_take(ip(1)).unwrap_err(), Full::Source);
        let _b1 = slots.try_take(ip(2)).unwrap();
        let _b2 = slots.try_take(ip(2)).unwrap();
        assert_eq!(slots.try_take(ip(3)).unwrap_err(), Full::Total);
        drop(a1);
        let _c = slots.try_take(ip(3)).unwrap();
        assert_eq!(slots.try_take(ip(1)).unwrap_err(), Full::Total);
        assert_eq!(slots.counts().len(), 3, "no entry left for refused sources");
    }
}
