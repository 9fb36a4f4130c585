//! [`Isolation`]: the four isolation levels of Go's STM.

#[cfg(doc)]
use super::Stm;
#[cfg(doc)]
use crate::read_cache::ReadCache;

/// The isolation level of an [`Stm`] transaction: which reads it makes and what its
/// commit checks. The same four levels as Go's `concurrency.NewSTM`, with the same commit
/// conditions.
///
/// | level | reads | the commit succeeds only if | guarantee |
/// |---|---|---|---|
/// | [`SerializableSnapshot`](Self::SerializableSnapshot) (default) | the first read from any member (serializable), fixing the snapshot at its revision; later ones read that revision | every key read is unchanged, and no key written was modified after the first read's revision (with a [`ReadCache`], see there) | serializable; a concurrent put to a key only written here is a conflict too (first committer wins; a concurrent delete is not, as in Go) |
/// | [`Serializable`](Self::Serializable) | as above | every key read is unchanged | serializable |
/// | [`RepeatableReads`](Self::RepeatableReads) | each read from any member, at its latest revision | every key read is unchanged | committed transactions are serializable, but one attempt may see values from different revisions (a state that never existed) before its commit fails |
/// | [`ReadCommitted`](Self::ReadCommitted) | each read from any member, at its latest revision | always | reads see committed data only; concurrent transactions can overwrite each other (lost updates) |
///
/// At every level, a key read twice in one attempt gives the same value, and a key written
/// reads back as written. At the snapshot levels, the first read does not go through the
/// leader (Go's does): a linearizable read waits for the leader's read index, which under
/// write load means the batch of writes in flight, and the commit's compares catch a
/// snapshot that lagged anyway (the attempt runs again). A read-only attempt whose
/// snapshot came from that first read therefore ends with a check: one read-only Txn
/// (which etcd answers without a raft write) comparing its reads' mod revisions, as Go's
/// commit Txn does. One whose snapshot came from a Txn (prefetched values, or those a
/// failed commit read back) was current then and sends no commit. Nor does one at
/// [`ReadCommitted`](Self::ReadCommitted), which checks nothing (Go sends a commit Txn with
/// no compares). So at every level but `ReadCommitted`, a committed transaction's reads
/// were current when it committed, and a read-only one sees every write acknowledged
/// before it began; at `ReadCommitted`, a read from a member that lags may miss one.
///
/// With a [`ReadCache`] ([`Stm::read_cache`]), an attempt reads the cached keys from one
/// revision of the copy, taken at its first cached read; at the snapshot levels, only if
/// that is its first read (and no prefetched values fixed its snapshot). The commit, even
/// a read-only one, at every level but [`ReadCommitted`](Self::ReadCommitted), then
/// checks those reads against etcd, so the guarantees above hold and what a committed
/// transaction read was current when it committed.
///
/// ```no_run
/// use etcd_concurrency::{Isolation, Stm};
/// # fn example(client: etcd_client::Client) {
/// let stm = Stm::new(client).isolation(Isolation::Serializable);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Isolation {
    /// Go's `SerializableSnapshot`.
    #[default]
    SerializableSnapshot,
    /// Go's `Serializable`.
    Serializable,
    /// Go's `RepeatableReads`.
    RepeatableReads,
    /// Go's `ReadCommitted`.
    ReadCommitted,
}

impl Isolation {
    /// Whether reads after the first are pinned to its revision.
    pub(super) fn snapshot_reads(self) -> bool {
        matches!(
            self,
            Isolation::SerializableSnapshot | Isolation::Serializable
        )
    }
}
