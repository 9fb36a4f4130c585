//! One attempt of an STM transaction: its reads, from the fresh values handed over, the
//! cache or etcd, and its buffered writes.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions, GetResponse};

use super::commit::CopyNeeds;
use super::{Fresh, Isolation, Read, Write, empty_key};
use crate::error::{Error, Result, is_compacted, is_future_revision};
use crate::read_cache::{ReadCache, View};
use crate::retry::retry;

/// How long an attempt waits for the cache to show the last write made through it, or a
/// change to a key under the prefix that a failed commit or check found, before reading
/// etcd instead (a copy without the write would be read stale for sure: a conflict, or at
/// ReadCommitted, which checks nothing, a read that misses the write). Either is an
/// event under the cache's prefix, so only a broken watch makes the wait run out, but for
/// a deletion the copy had not yet shown when the check ended: its revision is not known,
/// so the copy must reach the check's, which on a quiet prefix it does not. (A change
/// outside the prefix is no event of the copy's: it is not waited for, see [`CopyNeeds`].)
const CATCH_UP_LIMIT: Duration = Duration::from_millis(100);

/// One attempt of an [`Stm`](super::Stm) transaction: its reads and buffered writes
/// (Go's `STM` interface).
///
/// ```no_run
/// use etcd_concurrency::{Error, Stm};
/// # async fn example(stm: Stm) -> Result<(), Error> {
/// stm.run(async |tx| {
///     if tx.get("/config/enabled").await?.is_none() {
///         tx.put("/config/enabled", "yes"); // later gets read it back as written
///     }
///     tx.delete("/config/legacy");
///     Ok::<_, Error>(())
/// })
/// .await
/// # }
/// ```
pub struct StmTxn {
    pub(super) kv: Arc<Client>,
    pub(super) isolation: Isolation,
    pub(super) request_timeout: Duration,
    /// Keys read in this attempt (the read set).
    pub(super) reads: HashMap<Vec<u8>, Read>,
    /// Keys whose read failed or was dropped in this attempt, and not read since.
    pub(super) unread: HashSet<Vec<u8>>,
    /// Fresh values handed over from a failed commit or the prefetch, used on first read.
    pub(super) fresh: Fresh,
    pub(super) writes: HashMap<Vec<u8>, Write>,
    /// The revision reads are pinned to, for the snapshot levels.
    pub(super) snapshot: Option<i64>,
    /// A pinned read found its revision compacted (etcd's answer): this attempt cannot go
    /// on and must not commit; the next one starts from a fresh read.
    pub(super) compacted: Option<tonic::Status>,
    /// The cache this attempt may read: none once a compaction left it behind.
    pub(super) cache: Option<ReadCache>,
    /// The `Stm`'s cache, told of a commit that changes a key under its prefix even when
    /// this attempt does not read it (after a compaction).
    pub(super) noted_in: Option<ReadCache>,
    /// The cache as this attempt took it, at its first read of a key the cache holds.
    pub(super) view: Option<View>,
    /// The newest revision this Stm had seen when the attempt began: an attempt that read
    /// the cache checks its blind writes from no earlier.
    pub(super) seen: i64,
    /// Changes found by an earlier attempt's check, whose values it could not hand over:
    /// a copy that does not show them yet is not read.
    pub(super) copy_needs: CopyNeeds,
    /// The cache's copy did not show a write made through it: this attempt's reads from
    /// etcd not pinned to a snapshot are linearizable, as a serializable one from a lagging
    /// member could miss the write too.
    pub(super) behind_own_write: bool,
    /// The snapshot was fixed by a serializable read, which may lag the latest revision:
    /// a read-only attempt checks its reads before it returns.
    pub(super) snapshot_from_any_member: bool,
}

impl StmTxn {
    /// The value of `key` as this transaction sees it: `None` if absent (an empty value is
    /// `Some(vec![])`). A key written in this attempt reads back as written; otherwise the
    /// key joins the read set, and reading it again gives the same value. Go's
    /// `STM.Get`, which cannot tell absent from empty.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `key` is empty (a closure that goes on after it and
    /// returns `Ok` makes [`Stm::run`](super::Stm::run) return it too, and nothing is
    /// written).
    /// [`Error::Etcd`] / [`Error::Timeout`] if etcd could not be read within the request
    /// timeout. A read pinned to a revision that the serving member has not applied yet
    /// (etcd #11963) is not an error: it is sent again as a linearizable read, which waits
    /// for that revision. A read pinned to a revision etcd has compacted (an old copy of a
    /// quiet [`ReadCache`] prefix, or a long attempt) gives [`Error::Etcd`] with etcd's
    /// "compacted" error: return it (with `?`), and the closure runs again from a fresh
    /// snapshot, which does not count as a conflict; nothing it did in that run commits.
    ///
    /// A closure that goes on after a failed read and returns `Ok` anyway commits nothing
    /// either, unless it read the key successfully later in the run: as in Go, where a
    /// failed `Get` aborts the transaction, what it would write may rest on a value it
    /// never saw. The key is then read again: if that fails too,
    /// [`Stm::run`](super::Stm::run) returns the error; if not, the closure runs again with
    /// the value, which counts as a conflict.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver (see the crate docs).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a read whose future is dropped adds nothing to the read set; reading
    /// the key again reads it afresh. If the closure does not read it again, the run goes
    /// on as after a failed read (above).
    pub async fn get(&mut self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>> {
        let key = key.as_ref();
        if key.is_empty() {
            return Err(self.refuse_empty_key());
        }
        if let Some(write) = self.writes.get(key) {
            return Ok(match write {
                Write::Put { value, .. } => Some(value.clone()),
                Write::Delete => None,
            });
        }
        Ok(self.read(key).await?.value.clone())
    }

    /// Buffers a write of `value` to `key`, committed with the transaction. Go's `STM.Put`,
    /// without its options (for a lease, see [`put_with_lease`](Self::put_with_lease)). An
    /// empty `key` makes [`Stm::run`](super::Stm::run) return [`Error::InvalidArgument`]
    /// instead of committing: nothing is written.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.put_with_lease(key, value, 0);
    }

    /// Buffers a write of `value` to `key` attached to the lease `lease_id`, so that etcd
    /// deletes the key when the lease ends; committed with the transaction. A lease id of
    /// 0 attaches none, as [`put`](Self::put) does. Go's `STM.Put(key, val,
    /// clientv3.WithLease(id))`.
    ///
    /// A lease etcd does not know (expired or revoked) fails the commit: [`Stm::run`]
    /// returns [`Error::Etcd`] with etcd's "requested lease not found", and nothing is
    /// written. An empty `key` makes it return [`Error::InvalidArgument`] instead.
    ///
    /// [`Stm::run`]: super::Stm::run
    ///
    /// ```no_run
    /// use etcd_concurrency::{Error, Session, Stm};
    /// # async fn example(stm: Stm, session: Session) -> Result<(), Error> {
    /// // A worker's registration that goes when its session's lease ends.
    /// stm.run(async |tx| {
    ///     tx.put_with_lease("/workers/host-a", "ready", session.lease_id());
    ///     Ok::<_, Error>(())
    /// })
    /// .await
    /// # }
    /// ```
    pub fn put_with_lease(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease_id: i64,
    ) {
        let value = value.into();
        self.writes
            .insert(key.into(), Write::Put { value, lease_id });
    }

    /// Buffers a deletion of `key`, committed with the transaction. Go's `STM.Del`. An
    /// empty `key` makes [`Stm::run`](super::Stm::run) return [`Error::InvalidArgument`]
    /// instead of committing: nothing is written.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.writes.insert(key.into(), Write::Delete);
    }

    /// The mod revision of `key` as read by this transaction (0 if absent); the key joins
    /// the read set. A write buffered in this attempt does not change it: it is the
    /// revision of the value in etcd. Go's `STM.Rev`.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get).
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver (see the crate docs).
    ///
    /// # Cancel safety
    ///
    /// As [`get`](Self::get).
    ///
    /// ```no_run
    /// use etcd_concurrency::{Error, Stm};
    /// # async fn example(stm: Stm) -> Result<(), Error> {
    /// let version = stm.run(async |tx| tx.mod_revision("/config").await).await?;
    /// println!("/config last changed at revision {version}");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn mod_revision(&mut self, key: impl AsRef<[u8]>) -> Result<i64> {
        Ok(self.read(key.as_ref()).await?.mod_revision)
    }

    /// Refuses a read of the empty key as a failed read: an attempt that goes on without
    /// it does not commit (see [`Stm::run`](super::Stm::run)).
    fn refuse_empty_key(&mut self) -> Error {
        self.unread.insert(Vec::new());
        empty_key()
    }

    /// The read-set entry of `key`, reading it if needed.
    async fn read(&mut self, key: &[u8]) -> Result<&Read> {
        if key.is_empty() {
            return Err(self.refuse_empty_key());
        }
        if !self.reads.contains_key(key) {
            // Until the read succeeds (it may fail, or be dropped), the attempt lacks it.
            self.unread.insert(key.to_vec());
            let read = match self.fresh.values.remove(key) {
                Some(read) => read,
                None => match self.read_cached(key).await {
                    Some(read) => read,
                    None => self.fetch(key).await?,
                },
            };
            self.unread.remove(key);
            self.reads.insert(key.to_vec(), read);
        }
        Ok(&self.reads[key])
    }

    /// `key` from the attempt's view of the cache, if the cache holds it, the attempt's
    /// snapshot (if any) is that view's revision, and the view shows the changes earlier
    /// checks found.
    async fn read_cached(&mut self, key: &[u8]) -> Option<Read> {
        if !self.cache.as_ref().is_some_and(|cache| cache.covers(key)) {
            return None;
        }
        if self.view.is_none() {
            if self.isolation.snapshot_reads() && self.snapshot.is_some() {
                return None; // pinned already, by a read from etcd
            }
            let cache = self.cache.clone()?;
            let needs = self.copy_needs;
            let written = cache.written();
            cache
                .caught_up(written.max(needs.shown), CATCH_UP_LIMIT)
                .await;
            let view = cache.view()?;
            // A copy that does not show a write made through it would be read stale for
            // sure: conflicting, or at ReadCommitted not reading that write.
            self.behind_own_write = view.revision < written;
            let behind = if view.revision < needs.shown {
                Some("cache copy behind a change a check found; reading from etcd")
            } else if self.behind_own_write {
                Some("cache copy behind a write made through it; reading from etcd")
            } else if view.revision < needs.passed {
                Some("cache copy not past a change outside its prefix; reading from etcd")
            } else {
                None
            };
            if let Some(why) = behind {
                tracing::debug!(copy = view.revision, ?needs, "{why}");
                self.cache = None;
                return None;
            }
            if self.isolation.snapshot_reads() {
                self.snapshot = Some(view.revision);
            }
            self.view = Some(view);
        }
        let (value, mod_revision) = self.view.as_ref()?.get(key);
        Some(Read {
            value,
            mod_revision,
        })
    }

    async fn fetch(&mut self, key: &[u8]) -> Result<Read> {
        let options = match (self.isolation.snapshot_reads(), self.snapshot) {
            // Pinned to the snapshot: any member that has applied that revision.
            (true, Some(revision)) => GetOptions::new()
                .with_revision(revision)
                .with_serializable(),
            // Through the leader: the cache's copy did not show this Stm's own write, which
            // a lagging member could miss too.
            _ if self.behind_own_write => GetOptions::new(),
            // From any member, without waiting for the leader's read index (which, under
            // write load, waits for the batch in flight to apply). The first read of a
            // snapshot level fixes the snapshot there; if that member lagged, the commit's
            // compares (or a read-only attempt's check) fail and the attempt runs again.
            _ => {
                self.snapshot_from_any_member |= self.isolation.snapshot_reads();
                GetOptions::new().with_serializable()
            }
        };
        let answer = match self.get_with(key, options).await {
            // A lagging member: read the same revision through the leader instead.
            Err(Error::Etcd(error)) if is_future_revision(&error) => {
                tracing::debug!("pinned read ahead of its member; reading it linearizably");
                let revision = self.snapshot.unwrap_or_default();
                self.get_with(key, GetOptions::new().with_revision(revision))
                    .await
            }
            other => other,
        };
        let answer = match answer {
            Err(Error::Etcd(error)) if is_compacted(&error) => {
                if let etcd_client::Error::GRpcStatus(status) = &error {
                    self.compacted = Some(status.clone());
                }
                return Err(Error::Etcd(error));
            }
            other => other?,
        };
        if self.isolation.snapshot_reads() && self.snapshot.is_none() {
            self.snapshot = answer.header().map(|h| h.revision());
        }
        Ok(Read::from_answer(&answer))
    }

    async fn get_with(&self, key: &[u8], options: GetOptions) -> Result<GetResponse> {
        retry(&self.kv, "Range", self.request_timeout, |client| {
            let (mut kv, key, options) = (client.kv_client(), key.to_vec(), options.clone());
            async move { kv.get(key, Some(options)).await }
        })
        .await
    }
}

impl fmt::Debug for StmTxn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StmTxn")
            .field("isolation", &self.isolation)
            .field("reads", &self.reads.len())
            .field("writes", &self.writes.len())
            .field("snapshot", &self.snapshot)
            .finish_non_exhaustive()
    }
}
