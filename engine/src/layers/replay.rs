//! Marks forward passes that repeat one already made. Activation recomputation (gradient
//! checkpointing, [`crate::train::recompute`]) runs each block a second time in backward; layers
//! whose forward pass has a side effect (an observer's moving average, a recorder's sums) must
//! apply it once per real batch, and the repeat must compute with the state the first pass saw.
//!
//! The mark is per thread: a block's layers run on the thread that called the model (the kernels'
//! worker threads never call back into layers).

use std::cell::Cell;

thread_local! {
    static REPLAYING: Cell<bool> = const { Cell::new(false) };
}

/// Whether the forward pass running on this thread repeats one already made.
pub fn is_replaying() -> bool {
    REPLAYING.with(Cell::get)
}

/// Marks this thread's forward passes as repeats until dropped.
#[derive(Debug)]
pub struct Replaying {
    was: bool,
}

impl Replaying {
    /// Starts marking; the previous mark comes back when the guard is dropped.
    pub fn begin() -> Self {
        Self {
            was: REPLAYING.with(|r| r.replace(true)),
        }
    }
}

impl Drop for Replaying {
    fn drop(&mut self) {
        REPLAYING.with(|r| r.set(self.was));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_lasts_while_the_guard_lives_and_nests() {
        assert!(!is_replaying());
        {
            let _outer = Replaying::begin();
            assert!(is_replaying());
            {
                let _inner = Replaying::begin();
                assert!(is_replaying());
            }
            assert!(is_replaying());
        }
        assert!(!is_replaying());
        // Another thread never sees this thread's mark.
        let _guard = Replaying::begin();
        assert!(!std::thread::spawn(is_replaying).join().unwrap());
    }
}
