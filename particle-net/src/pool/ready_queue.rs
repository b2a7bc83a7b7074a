//! The pool's hot path: a queue of ready items whose `take` is one short
//! critical section and says whether the level fell below the low watermark.
//! Producers (the refiller, the recycler) first *reserve* room below the high
//! watermark, so that together they never overfill the pool. Generic so that
//! its cost can be measured without a kernel (benches/).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not wedge the pool: every critical section is a
    // single push, pop or flag write, so the data stays consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug)]
struct Inner<T> {
    items: VecDeque<T>,
    /// Room promised to producers that are still building.
    reserved: usize,
}

#[derive(Debug)]
pub struct ReadyQueue<T> {
    inner: Mutex<Inner<T>>,
    /// Signalled whenever items are added.
    filled: Condvar,
    // Atomics: a standing warm target can change while the pool runs.
    low_watermark: AtomicUsize,
    high_watermark: AtomicUsize,
}

impl<T> ReadyQueue<T> {
    pub fn new(low_watermark: usize, high_watermark: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                items: VecDeque::with_capacity(high_watermark),
                reserved: 0,
            }),
            filled: Condvar::new(),
            low_watermark: AtomicUsize::new(low_watermark),
            high_watermark: AtomicUsize::new(high_watermark),
        }
    }

    /// Moves the watermarks; items above a lowered high watermark stay until taken.
    pub fn set_watermarks(&self, low_watermark: usize, high_watermark: usize) {
        self.low_watermark.store(low_watermark, Ordering::Relaxed);
        self.high_watermark.store(high_watermark, Ordering::Relaxed);
    }

    /// Takes up to `n` items beyond the high watermark (after it was lowered).
    pub fn take_surplus(&self) -> Vec<T> {
        let high = self.high_watermark.load(Ordering::Relaxed);
        let mut inner = lock(&self.inner);
        let surplus = inner.items.len().saturating_sub(high);
        inner.items.drain(..surplus).collect()
    }

    /// Takes the oldest item; the flag says the level is now below the low
    /// watermark and a refill is due.
    pub fn take(&self) -> (Option<T>, bool) {
        let mut inner = lock(&self.inner);
        let item = inner.items.pop_front();
        let below = inner.items.len() < self.low_watermark.load(Ordering::Relaxed);
        (item, below)
    }

    /// Reserves room for up to `wanted` items below the high watermark and
    /// returns how much it got; hand it back with [`Self::fill`].
    pub fn reserve(&self, wanted: usize) -> usize {
        let mut inner = lock(&self.inner);
        let taken = inner.items.len() + inner.reserved;
        let high = self.high_watermark.load(Ordering::Relaxed);
        let got = wanted.min(high.saturating_sub(taken));
        inner.reserved += got;
        got
    }

    /// Adds items into a reservation of `reserved` slots and releases it
    /// (items beyond the reservation are returned, not added).
    pub fn fill(&self, new: Vec<T>, reserved: usize) -> Vec<T> {
        let mut new = new;
        let rest = new.split_off(new.len().min(reserved));
        {
            let mut inner = lock(&self.inner);
            inner.reserved = inner.reserved.saturating_sub(reserved);
            inner.items.extend(new);
        }
        self.filled.notify_all();
        rest
    }

    /// Adds items without a reservation (may exceed the high watermark).
    pub fn push_many(&self, new: impl IntoIterator<Item = T>) {
        lock(&self.inner).items.extend(new);
        self.filled.notify_all();
    }

    pub fn len(&self) -> usize {
        lock(&self.inner).items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `f` of every ready item, in one critical section (keep `f` cheap).
    pub fn map_each<U>(&self, f: impl FnMut(&T) -> U) -> Vec<U> {
        lock(&self.inner).items.iter().map(f).collect()
    }

    pub fn drain(&self) -> Vec<T> {
        lock(&self.inner).items.drain(..).collect()
    }

    /// Waits until at least `wanted` items are ready; on timeout returns how many were.
    pub fn wait_len(&self, wanted: usize, timeout: Duration) -> Result<(), usize> {
        let start = Instant::now();
        let mut inner = lock(&self.inner);
        while inner.items.len() < wanted {
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(inner.items.len());
            }
            inner = self
                .filled
                .wait_timeout(inner, timeout - waited)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_reports_the_low_watermark() {
        let q = ReadyQueue::new(2, 4);
        q.push_many([1, 2, 3]);
        assert_eq!(q.take(), (Some(1), false));
        assert_eq!(q.take(), (Some(2), true));
        assert_eq!(q.take(), (Some(3), true));
        assert_eq!(q.take(), (None, true));
    }

    #[test]
    fn reservations_never_overfill() {
        let q = ReadyQueue::new(1, 4);
        q.push_many([1]);
        assert_eq!(q.reserve(2), 2);
        assert_eq!(q.reserve(5), 1, "1 ready + 2 + 1 reserved = high");
        assert_eq!(q.reserve(1), 0);
        // A producer that built less than it reserved gives the rest back.
        assert!(q.fill(vec![2], 2).is_empty());
        assert_eq!(q.reserve(3), 1);
        // One that built more gets the surplus back.
        assert_eq!(q.fill(vec![3, 4, 5], 2), vec![5]);
        assert_eq!(q.len(), 4);
        assert_eq!(q.reserve(1), 0);
    }

    #[test]
    fn watermarks_move_and_surplus_comes_out() {
        let q = ReadyQueue::new(1, 2);
        assert_eq!(q.reserve(5), 2);
        q.fill(vec![1, 2], 2);
        q.set_watermarks(3, 4);
        assert_eq!(q.reserve(5), 2);
        q.fill(vec![3, 4], 2);
        q.set_watermarks(0, 1);
        assert_eq!(q.take_surplus(), vec![1, 2, 3]);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn wait_len_wakes_on_push_and_times_out_with_the_level() {
        let q = std::sync::Arc::new(ReadyQueue::new(0, 4));
        let q2 = q.clone();
        let pusher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            q2.push_many([1, 2]);
        });
        assert_eq!(q.wait_len(2, Duration::from_secs(10)), Ok(()));
        pusher.join().unwrap();
        assert_eq!(q.wait_len(3, Duration::from_millis(20)), Err(2));
    }
}
