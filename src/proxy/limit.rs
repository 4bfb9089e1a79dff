//! Connection limits (`--max-connections`, omni's `ambassadord.max-connections.<port>`):
//! a shared count of open connections and the slot each one holds while it is open.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// One connection's place under a limit; dropping it frees the place.
#[must_use = "the slot is freed when dropped"]
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A slot of `count`, if fewer than `max` are taken: taking one is a single atomic step,
/// so connections racing on several data threads never exceed the limit.
pub fn take(count: &Arc<AtomicU32>, max: u32) -> Option<Slot> {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(count.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_slots_and_freed_on_drop() {
        let count = Arc::new(AtomicU32::new(0));
        let held: Vec<Slot> = (0..5).filter_map(|_| take(&count, 3)).collect();
        assert_eq!(held.len(), 3);
        assert_eq!(count.load(Ordering::Acquire), 3);
        drop(held);
        assert_eq!(count.load(Ordering::Acquire), 0);
        assert!(take(&count, 3).is_some());
    }

    /// Taken from many threads at once, the limit still holds exactly.
    #[test]
    fn racing_threads_never_exceed_the_limit() {
        let count = Arc::new(AtomicU32::new(0));
        let held = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if let Some(slot) = take(&count, 10) {
                            held.lock().unwrap().push(slot);
                        }
                    }
                });
            }
        });
        assert_eq!(held.lock().unwrap().len(), 10);
        assert_eq!(count.load(Ordering::Acquire), 10);
    }
}
