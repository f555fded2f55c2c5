//! `DataCursor`: seeded, per-epoch shuffled batches that resume exactly from a checkpoint.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{Dataset, Problem};

/// Where a [`DataCursor`] stands; saved with a checkpoint to resume the same sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorState {
    /// The seed every epoch's order derives from.
    pub seed: u64,
    /// The current epoch (0 first).
    pub epoch: u64,
    /// How many problems of the current epoch have been handed out (always < `len`).
    pub position: usize,
    /// The dataset size the orders are drawn for; restoring against another size is refused.
    pub len: usize,
}

/// Why a cursor cannot be built or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CursorError {
    /// A cursor over no problems.
    #[error("a data cursor needs at least one problem")]
    Empty,
    /// A restored position past the end of the epoch.
    #[error("cursor position {position} is past the end of a dataset of {len} problems")]
    PositionOutOfRange {
        /// The position.
        position: usize,
        /// The dataset size.
        len: usize,
    },
    /// The dataset is not the size the cursor was made for.
    #[error("the cursor was made for {expected} problems but the dataset has {found}")]
    LengthMismatch {
        /// The size in the cursor's state.
        expected: usize,
        /// The dataset's size.
        found: usize,
    },
}

/// Hands out problem indices epoch by epoch, each epoch in its own seeded shuffled order.
///
/// Within an epoch no index repeats. Epoch `e`'s order is a shuffle seeded from
/// `(seed, e)`, so it depends on nothing else: a cursor rebuilt from a saved
/// [`CursorState`] continues exactly as the original would have. A batch that crosses the end
/// of an epoch takes the rest of that epoch and then continues with the start of the next
/// epoch's order (so a batch near the boundary may hold a problem twice when the dataset is
/// small, and a batch larger than the dataset always does).
#[derive(Debug, Clone)]
pub struct DataCursor {
    state: CursorState,
    order: Vec<usize>,
}

impl DataCursor {
    /// A cursor at the start of epoch 0 over `len` problems.
    pub fn new(len: usize, seed: u64) -> Result<Self, CursorError> {
        Self::restore(CursorState {
            seed,
            epoch: 0,
            position: 0,
            len,
        })
    }

    /// A cursor at the start of epoch 0 over `dataset`.
    pub fn for_dataset(dataset: &Dataset, seed: u64) -> Self {
        let len = dataset.len().max(1);
        let state = CursorState {
            seed,
            epoch: 0,
            position: 0,
            len,
        };
        Self {
            order: epoch_order(&state),
            state,
        }
    }

    /// A cursor that continues from a saved state.
    pub fn restore(state: CursorState) -> Result<Self, CursorError> {
        if state.len == 0 {
            return Err(CursorError::Empty);
        }
        if state.position >= state.len {
            return Err(CursorError::PositionOutOfRange {
                position: state.position,
                len: state.len,
            });
        }
        Ok(Self {
            order: epoch_order(&state),
            state,
        })
    }

    /// The state to save with a checkpoint.
    pub fn state(&self) -> CursorState {
        self.state
    }

    /// The next `n` problem indices (crossing into the next epoch when this one runs out).
    pub fn next_indices(&mut self, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let take = (n - out.len()).min(self.state.len - self.state.position);
            let start = self.state.position;
            out.extend_from_slice(&self.order[start..start + take]);
            self.state.position += take;
            if self.state.position == self.state.len {
                self.state.epoch += 1;
                self.state.position = 0;
                self.order = epoch_order(&self.state);
            }
        }
        out
    }

    /// The next `n` problems of `dataset`, which must be the size the cursor was made for.
    pub fn next_batch(&mut self, dataset: &Dataset, n: usize) -> Result<Vec<Problem>, CursorError> {
        if dataset.len() != self.state.len {
            return Err(CursorError::LengthMismatch {
                expected: self.state.len,
                found: dataset.len(),
            });
        }
        Ok(self
            .next_indices(n)
            .into_iter()
            .filter_map(|i| dataset.get(i).cloned())
            .collect())
    }
}

/// The shuffled order of `state.epoch`.
fn epoch_order(state: &CursorState) -> Vec<usize> {
    let mut order: Vec<usize> = (0..state.len).collect();
    let mut rng = StdRng::seed_from_u64(mix(state.seed, state.epoch));
    order.shuffle(&mut rng);
    order
}

/// A well-spread 64-bit seed from two words (SplitMix64 finaliser over a combination).
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_is_a_permutation_and_epochs_differ() {
        let mut c = DataCursor::new(50, 3).unwrap();
        let e0 = c.next_indices(50);
        let e1 = c.next_indices(50);
        for e in [&e0, &e1] {
            let mut s = e.clone();
            s.sort_unstable();
            assert_eq!(s, (0..50).collect::<Vec<_>>());
        }
        assert_ne!(e0, e1, "each epoch is reshuffled");
        assert_ne!(e0, (0..50).collect::<Vec<_>>(), "the order is shuffled");
        assert_eq!(c.state().epoch, 2);
    }

    #[test]
    fn bad_states_are_refused() {
        assert_eq!(DataCursor::new(0, 1).unwrap_err(), CursorError::Empty);
        let bad = CursorState {
            seed: 1,
            epoch: 0,
            position: 5,
            len: 5,
        };
        assert!(matches!(
            DataCursor::restore(bad),
            Err(CursorError::PositionOutOfRange { .. })
        ));
    }

    #[test]
    fn mix_separates_nearby_inputs() {
        assert_ne!(mix(0, 0), mix(0, 1));
        assert_ne!(mix(1, 0), mix(0, 1));
    }
}
