//! Bounds on the connections a server holds, in all and per caller (an
//! address, a pid, a tenant): every server a tenant or a stranger can reach
//! counts its connections here and closes the ones over the caps at once,
//! so one flooding caller cannot take the descriptors everyone needs.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

/// Open connections, counted per caller.
#[derive(Debug)]
pub struct ConnectionCaps<K: Hash + Eq + Clone> {
    total: usize,
    per_caller: usize,
    open: Arc<Mutex<HashMap<K, usize>>>,
}

/// One open connection; dropping it gives its place back.
#[derive(Debug)]
pub struct CapPermit<K: Hash + Eq + Clone> {
    open: Arc<Mutex<HashMap<K, usize>>>,
    caller: K,
}

impl<K: Hash + Eq + Clone> ConnectionCaps<K> {
    pub fn new(total: usize, per_caller: usize) -> Self {
        Self {
            total,
            per_caller,
            open: Arc::default(),
        }
    }

    /// A place for one more connection of `caller`, or `None` over a cap.
    pub fn enter(&self, caller: K) -> Option<CapPermit<K>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let total: usize = open.values().sum();
        let mine = open.entry(caller.clone()).or_insert(0);
        if total >= self.total || *mine >= self.per_caller {
            if *mine == 0 {
                open.remove(&caller);
            }
            return None;
        }
        *mine += 1;
        Some(CapPermit {
            open: self.open.clone(),
            caller,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum()
    }
}

impl<K: Hash + Eq + Clone> Drop for CapPermit<K> {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_in_all_and_per_caller_and_give_places_back() {
        let caps = ConnectionCaps::new(3, 2);
        let a1 = caps.enter("a");
        let a2 = caps.enter("a");
        assert!(a1.is_some() && a2.is_some());
        assert!(caps.enter("a").is_none(), "per caller");
        let b1 = caps.enter("b");
        assert!(b1.is_some());
        assert!(caps.enter("c").is_none(), "in all");
        drop(a1);
        assert!(caps.enter("c").is_some(), "a place given back");
        drop((a2, b1));
        assert_eq!(caps.open(), 0);
    }
}
