//! Records from the ring → complete groups of complete batches.
//!
//! Records carry their batch id, group id, group size, index in the group and the number of
//! groups in their batch. A group is trained on only when all its members arrived: a missing
//! member (a quarantined slot, a server killed mid-batch) would change the group mean. A batch
//! is handed on when all its groups are complete, or, incomplete, when a record of a later batch
//! shows that nothing more of it will come. Staleness is judged at hand-over against the
//! learner's version: older than `max_staleness` versions, or newer than the learner (weights
//! that a resumed learner rolled back), the group is dropped and counted.

use protocol::RolloutRecord;
use serde::Serialize;
use std::collections::BTreeMap;

/// What happened to the records of one batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AssemblyStats {
    /// Groups the batch announced.
    pub announced_groups: usize,
    /// Complete groups handed on for training.
    pub complete_groups: usize,
    /// Groups dropped because a member never arrived.
    pub incomplete_groups: usize,
    /// Groups dropped as older than `max_staleness` versions.
    pub stale_groups: usize,
    /// Groups dropped because their version is newer than the learner's (rolled back).
    pub rolled_back_groups: usize,
    /// Records that repeated a (group, index) already held, or contradicted their group's
    /// size; dropped.
    pub inconsistent_records: usize,
    /// Largest staleness (learner version − record version) among the trained groups.
    pub max_staleness: u64,
    /// Mean staleness over the trained groups.
    pub mean_staleness: f64,
}

/// One batch, ready for [`crate::prepare_batch`].
#[derive(Debug, Clone)]
pub struct AssembledBatch {
    /// The batch id.
    pub batch_id: u64,
    /// Complete, fresh groups, in group-id order (members in group-index order).
    pub groups: Vec<Vec<RolloutRecord>>,
    /// Counters.
    pub stats: AssemblyStats,
}

#[derive(Debug)]
struct Partial {
    batch_id: u64,
    batch_groups: u32,
    groups: BTreeMap<u64, Vec<Option<RolloutRecord>>>,
    inconsistent: usize,
}

impl Partial {
    fn new(rec: &RolloutRecord) -> Self {
        Self {
            batch_id: rec.batch_id,
            batch_groups: rec.batch_groups,
            groups: BTreeMap::new(),
            inconsistent: 0,
        }
    }

    fn add(&mut self, rec: RolloutRecord) {
        let size = rec.group_size as usize;
        let index = rec.group_index as usize;
        let members = self
            .groups
            .entry(rec.group_id)
            .or_insert_with(|| vec![None; size]);
        if members.len() != size || index >= size || members[index].is_some() {
            self.inconsistent += 1;
            return;
        }
        members[index] = Some(rec);
    }

    fn is_complete(&self) -> bool {
        self.groups.len() == self.batch_groups as usize
            && self.groups.values().all(|m| m.iter().all(Option::is_some))
    }
}

/// Assembles batches from records popped in ring order.
#[derive(Debug)]
pub struct BatchAssembler {
    max_staleness: u64,
    current: Option<Partial>,
}

impl BatchAssembler {
    /// An assembler that drops groups more than `max_staleness` versions old.
    pub fn new(max_staleness: u64) -> Self {
        Self {
            max_staleness,
            current: None,
        }
    }

    /// The batch being assembled, if any.
    pub fn pending_batch(&self) -> Option<u64> {
        self.current.as_ref().map(|p| p.batch_id)
    }

    /// Adds one record. Returns the batches this completes: the current one when the record
    /// completes it, or the previous, incomplete one when the record starts a new batch (then
    /// possibly the new one too, if it is a batch of one record). `version` is the learner's
    /// policy version, against which staleness is judged.
    pub fn push(&mut self, rec: RolloutRecord, version: u64) -> Vec<AssembledBatch> {
        let mut out = Vec::new();
        if let Some(cur) = &self.current {
            if cur.batch_id != rec.batch_id {
                if let Some(done) = self.flush(version) {
                    out.push(done);
                }
            }
        }
        let cur = self.current.get_or_insert_with(|| Partial::new(&rec));
        cur.add(rec);
        if cur.is_complete() {
            if let Some(done) = self.flush(version) {
                out.push(done);
            }
        }
        out
    }

    /// Hands on the current batch as it is (incomplete groups dropped), e.g. when the
    /// producer restarted and will not finish it.
    pub fn flush(&mut self, version: u64) -> Option<AssembledBatch> {
        let cur = self.current.take()?;
        let mut stats = AssemblyStats {
            announced_groups: cur.batch_groups as usize,
            inconsistent_records: cur.inconsistent,
            ..AssemblyStats::default()
        };
        // Groups that never sent a single record are missing too.
        stats.incomplete_groups = (cur.batch_groups as usize).saturating_sub(cur.groups.len());
        let mut groups = Vec::new();
        let mut staleness_sum = 0u64;
        for (_, members) in cur.groups {
            let Some(members) = members.into_iter().collect::<Option<Vec<_>>>() else {
                stats.incomplete_groups += 1;
                continue;
            };
            let v = members.iter().map(|r| r.policy_version).min().unwrap_or(0);
            let newest = members.iter().map(|r| r.policy_version).max().unwrap_or(0);
            if newest > version {
                stats.rolled_back_groups += 1;
                continue;
            }
            let staleness = version - v;
            if staleness > self.max_staleness {
                stats.stale_groups += 1;
                continue;
            }
            stats.max_staleness = stats.max_staleness.max(staleness);
            staleness_sum += staleness;
            groups.push(members);
        }
        stats.complete_groups = groups.len();
        if !groups.is_empty() {
            stats.mean_staleness = staleness_sum as f64 / groups.len() as f64;
        }
        Some(AssembledBatch {
            batch_id: cur.batch_id,
            groups,
            stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::tests::record;

    fn rec(batch: u64, group: u64, index: u32, size: u32, groups: u32, v: u64) -> RolloutRecord {
        let mut r = record(group, index as f32, vec![1, 2]);
        r.batch_id = batch;
        r.group_size = size;
        r.group_index = index;
        r.batch_groups = groups;
        r.policy_version = v;
        r
    }

    #[test]
    fn a_complete_batch_is_handed_on_at_its_last_record() {
        let mut a = BatchAssembler::new(1);
        let mut out = Vec::new();
        for g in 0..2 {
            for i in 0..3 {
                out.extend(a.push(rec(7, g, i, 3, 2, 4), 4));
            }
        }
        assert_eq!(out.len(), 1);
        let b = &out[0];
        assert_eq!(b.batch_id, 7);
        assert_eq!(b.groups.len(), 2);
        assert!(b.groups.iter().all(|g| g.len() == 3));
        assert_eq!(
            b.groups[1]
                .iter()
                .map(|r| r.group_index)
                .collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(b.stats.complete_groups, 2);
        assert_eq!(a.pending_batch(), None);
    }

    #[test]
    fn a_missing_member_drops_its_group_when_the_next_batch_starts() {
        let mut a = BatchAssembler::new(1);
        // Batch 1: group 10 complete, group 11 misses member 1 (quarantined).
        for r in [
            rec(1, 10, 0, 2, 2, 0),
            rec(1, 10, 1, 2, 2, 0),
            rec(1, 11, 0, 2, 2, 0),
        ] {
            assert!(a.push(r, 0).is_empty());
        }
        let out = a.push(rec(2, 20, 0, 2, 1, 0), 0);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].batch_id, 1);
        assert_eq!(out[0].groups.len(), 1);
        assert_eq!(out[0].groups[0][0].group_id, 10);
        assert_eq!(out[0].stats.incomplete_groups, 1);
        assert_eq!(a.pending_batch(), Some(2));
        // A batch whose groups never arrived at all counts them as incomplete.
        let flushed = a.flush(0).expect("pending batch");
        assert_eq!(flushed.stats.incomplete_groups, 1);
        assert!(flushed.groups.is_empty());
    }

    #[test]
    fn stale_and_rolled_back_groups_are_dropped_and_counted() {
        let mut a = BatchAssembler::new(1);
        let mut out = Vec::new();
        // Learner at version 5: v4 is fresh enough (staleness 1), v3 is stale, v6 was rolled back.
        for (g, v) in [(0, 4), (1, 3), (2, 6), (3, 5)] {
            for i in 0..2 {
                out.extend(a.push(rec(9, g, i, 2, 4, v), 5));
            }
        }
        assert_eq!(out.len(), 1);
        let s = &out[0].stats;
        assert_eq!(
            (s.complete_groups, s.stale_groups, s.rolled_back_groups),
            (2, 1, 1)
        );
        assert_eq!(s.max_staleness, 1);
        assert!((s.mean_staleness - 0.5).abs() < 1e-12);
    }

    #[test]
    fn duplicates_and_contradicting_sizes_are_counted_not_trained() {
        let mut a = BatchAssembler::new(0);
        assert!(a.push(rec(1, 0, 0, 2, 1, 0), 0).is_empty());
        // Same (group, index) again, and a member that claims another group size.
        assert!(a.push(rec(1, 0, 0, 2, 1, 0), 0).is_empty());
        assert!(a.push(rec(1, 0, 1, 3, 1, 0), 0).is_empty());
        let out = a.push(rec(1, 0, 1, 2, 1, 0), 0);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].stats.inconsistent_records, 2);
        assert_eq!(out[0].groups.len(), 1);
    }
}
