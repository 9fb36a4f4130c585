//! A local copy of the keys under a prefix, kept current by one watch, that [`Stm`]
//! transactions read instead of asking etcd.
//!
//! [`Stm`]: crate::Stm

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{Client, Event, EventType, GetOptions, KeyValue};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[cfg(doc)]
use crate::Isolation;
use crate::error::{Error, Result};
use crate::watcher::{Follower, Update};

/// A copy of every key under a prefix, kept current by a watch, for [`Stm`] transactions
/// to read without a round trip (see [`Stm::read_cache`]).
///
/// A transaction that reads a key under the prefix takes the copy as it stands (one
/// revision of etcd, never a mix of two) and reads every such key from it. Its commit
/// still checks every key read against etcd, exactly as without a cache, so at the
/// serializable and repeatable-read levels a copy that lags behind etcd never lets a
/// transaction commit on stale values: it only costs a conflict, and the next attempt
/// runs with the values the failed commit read. At the snapshot isolation levels a
/// read-only transaction that used the copy also ends with that check (one read-only
/// Txn, which etcd answers without a raft write), so what it returns was current at that
/// check. At [`Isolation::ReadCommitted`], which checks nothing, cached reads are simply
/// reads of committed data that may be a little old, like its reads from any member.
///
/// Transactions read the writes made through the cache: after a commit of a [`Stm`]
/// reading this cache changes a key under the prefix, the next attempt of every such
/// [`Stm`] waits (briefly) for the copy to show that commit before reading it, and reads
/// from etcd if it does not by then (its watch broken).
///
/// The copy's [`revision`](Self::revision) moves only when something under the prefix
/// changes. An attempt that takes its snapshot from the copy pins its reads to that
/// revision, so a key *outside* the prefix that it reads is read at that revision (if
/// etcd has compacted it, the rest of the run reads from etcd). If the key has changed
/// since, the attempt conflicts and the run's next attempts read it from etcd, but the
/// first attempt of each later run conflicts again, until something under the prefix
/// changes: keep keys that change often and are read with the cached ones under the
/// prefix too. At [`Isolation::SerializableSnapshot`], a key that an attempt reading the
/// copy writes without reading (under the prefix or not) must be unchanged since the
/// copy's revision or, if newer, since the newest revision at which etcd answered a
/// commit or a check of the same [`Stm`] (or a clone), so a write to it in between is not
/// a conflict. Either is sound, as the commit checks that every read is still current;
/// the newer one keeps a quiet prefix from turning the `Stm`'s own earlier writes into
/// conflicts, and a lagging copy from failing every attempt on such a key.
///
/// Worth it for a small, hot range read by many transactions (the account balances of
/// the bank example): each transaction saves one round trip per key read, and etcd
/// serves one watch per cache instead. Every change under the prefix is sent to every
/// cache, so it does not pay for a large range of which each client reads a little.
///
/// The watch starts "now" and is re-opened after failures (member killed, connection
/// lost or frozen, compaction) with a fresh read of the range, so nothing is missed. A
/// member cut off from the raft leader keeps its watches open, answering progress requests
/// with its own, stale revision, so a copy watched through it stops moving (at every level
/// but [`Isolation::ReadCommitted`] that costs conflicts, not correctness) until the cache
/// sees the member fall behind the cluster and re-opens its watch through another member,
/// within about 20 s of the cut: connect with etcd-client's
/// `ConnectOptions::with_require_leader(true)` to have etcd cancel such watches within
/// about 2 s instead.
/// While it is broken, transactions go on reading the last copy (and conflict if it is
/// stale; after a second conflict and its back-off, an attempt reads from etcd unless the
/// copy holds every key the failed commit read and has caught up with their values;
/// after a read-only check finds a change among keys it reads without values, past the
/// 128 one Txn compares, the next attempt reads from etcd unless the copy shows that
/// change). If etcd refuses the watch for good (permissions revoked), a warning is logged
/// and transactions read from etcd again; so they do once the runtime the cache was made
/// on has shut down, since the task that kept the copy current ran there.
///
/// `ReadCache` is a cheap [`Clone`] handle: within one process, give every [`Stm`] a
/// clone of one cache rather than a cache each, as etcd sends every change to every
/// watch (with eight caches instead of one, etcd committed 22% fewer Txns per second in
/// this crate's benchmark). The watch and its task stop when the last handle (including
/// those held by [`Stm`]s) is dropped. Memory: the keys and values under the prefix.
///
/// Mirrors nothing in Go's `concurrency` package; the nearest is the `leasing` KV of
/// etcd's Go client, which caches keys under leases instead of validating at commit.
///
/// ```no_run
/// use etcd_concurrency::{Error, ReadCache, Stm};
///
/// # async fn example(client: etcd_client::Client) -> Result<(), Error> {
/// let accounts = ReadCache::watch(client.clone(), "/accounts/").await?;
/// let stm = Stm::new(client).read_cache(accounts);
/// stm.run(async |tx| {
///     let alice = tx.get("/accounts/alice").await?; // from the copy: no round trip
///     tx.put("/accounts/bob", alice.unwrap_or_default());
///     Ok::<_, Error>(())
/// })
/// .await?;
/// # Ok(())
/// # }
/// ```
///
/// [`Stm`]: crate::Stm
/// [`Stm::read_cache`]: crate::Stm::read_cache
#[derive(Clone)]
pub struct ReadCache {
    shared: Arc<Shared>,
}

struct Shared {
    prefix: Vec<u8>,
    view: watch::Receiver<View>,
    follower: JoinHandle<()>,
    /// The revision of the newest commit that changed a key under the prefix, made by an
    /// `Stm` reading this cache.
    written: AtomicI64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// The keys under the prefix as of one revision. Cloning is cheap (a persistent map), so
/// a transaction keeps its own snapshot while the watch moves the cache on.
#[derive(Clone, Debug, Default)]
pub(crate) struct View {
    /// The revision this view is current as of; 0 once the cache has stopped for good.
    pub(crate) revision: i64,
    entries: imbl::HashMap<Vec<u8>, Entry>,
}

#[derive(Clone, Debug)]
struct Entry {
    value: Vec<u8>,
    mod_revision: i64,
}

impl ReadCache {
    /// Reads every key under `prefix` (linearizably) and starts the watch that keeps the
    /// copy current. Returns once the copy is complete. A range larger than the client
    /// accepts in one answer (etcd-client's default limit is 4 MiB; its values, or even
    /// its keys alone) is read in parts, at one revision. No Go counterpart: Go's STM reads
    /// every key from etcd.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidArgument`] if `prefix` is empty (the whole keyspace).
    /// - [`Error::Etcd`] if etcd refuses the read or the watch (e.g. permission denied),
    ///   or if the copy could not be made within 5 s and an attempt failed: the last
    ///   failure, such as a refused connection when no member is reachable.
    /// - [`Error::Timeout`] if the copy could not be made within 5 s and its attempts went
    ///   unanswered without failing: no member answering, or round trips over about 2.4 s
    ///   (opening the watch and reading the range take one each).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes cancels the watch; nothing is left running.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime (the watch is read by a spawned task), or in one without
    /// its time driver (the first copy is read within a time limit).
    pub async fn watch(client: Client, prefix: impl Into<Vec<u8>>) -> Result<ReadCache> {
        const FIRST_COPY_LIMIT: Duration = Duration::from_secs(5);
        let prefix = prefix.into();
        if prefix.is_empty() {
            return Err(Error::InvalidArgument(
                "a read cache needs a non-empty key prefix".into(),
            ));
        }
        let mut follower = Follower::new(client, prefix.clone(), true, GetOptions::new(), 0);
        let first = follower.next_within(FIRST_COPY_LIMIT).await?;
        let (view, subscribed) = watch::channel(View::default());
        publish(&view, first);
        let follower = tokio::spawn(keep_current(follower, view));
        Ok(ReadCache {
            shared: Arc::new(Shared {
                prefix,
                view: subscribed,
                follower,
                written: AtomicI64::new(0),
            }),
        })
    }

    /// The prefix whose keys this cache holds.
    pub fn prefix(&self) -> &[u8] {
        &self.shared.prefix
    }

    /// The revision the copy is current as of: every change under the prefix up to this
    /// revision has been applied. It moves only when something under the prefix changes
    /// (or the range is read again), so it can be far behind etcd's revision while the
    /// prefix is quiet. 0 if the cache has stopped: etcd refused its watch, or the runtime
    /// it was made on has shut down, ending the task that kept it current.
    pub fn revision(&self) -> i64 {
        self.view().map_or(0, |view| view.revision)
    }

    /// Whether `key` is under this cache's prefix.
    pub(crate) fn covers(&self, key: &[u8]) -> bool {
        key.starts_with(&self.shared.prefix)
    }

    /// Notes a commit at `revision` that changed a key under the prefix.
    pub(crate) fn wrote(&self, revision: i64) {
        self.shared.written.fetch_max(revision, Ordering::Relaxed);
    }

    /// The revision of the newest commit noted by [`wrote`](Self::wrote).
    pub(crate) fn written(&self) -> i64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Waits until the copy is current as of `revision` (or the cache has stopped), for at
    /// most `limit`.
    pub(crate) async fn caught_up(&self, revision: i64, limit: Duration) {
        let mut view = self.shared.view.clone();
        let reached = view.wait_for(|view| view.revision >= revision || view.revision == 0);
        let _ = tokio::time::timeout(limit, reached).await;
    }

    /// The copy as it stands, or `None` if the cache has stopped: marked so, or left
    /// without its task (the runtime it ran on shut down).
    pub(crate) fn view(&self) -> Option<View> {
        let kept_current = self.shared.view.has_changed().is_ok();
        let view = self.shared.view.borrow();
        (kept_current && view.revision > 0).then(|| view.clone())
    }
}

impl fmt::Debug for ReadCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadCache")
            .field("prefix", &String::from_utf8_lossy(&self.shared.prefix))
            .field("revision", &self.revision())
            .finish_non_exhaustive()
    }
}

impl View {
    /// The value and mod revision of `key` in this view (`None` and 0 if absent).
    pub(crate) fn get(&self, key: &[u8]) -> (Option<Vec<u8>>, i64) {
        match self.entries.get(key) {
            Some(entry) => (Some(entry.value.clone()), entry.mod_revision),
            None => (None, 0),
        }
    }

    /// The mod revision of `key` in this view (0 if absent).
    pub(crate) fn mod_revision(&self, key: &[u8]) -> i64 {
        self.entries.get(key).map_or(0, |entry| entry.mod_revision)
    }

    /// The view made of a range read at `revision`.
    fn of(kvs: &[KeyValue], revision: i64) -> View {
        View {
            revision,
            entries: kvs
                .iter()
                .map(|kv| (kv.key().to_vec(), Entry::of(kv)))
                .collect(),
        }
    }

    fn apply_event(&mut self, event: &Event) {
        let Some(kv) = event.kv() else { return };
        match event.event_type() {
            EventType::Put => {
                self.entries.insert(kv.key().to_vec(), Entry::of(kv));
            }
            EventType::Delete => {
                self.entries.remove(kv.key());
            }
        }
        self.revision = self.revision.max(kv.mod_revision());
    }
}

impl Entry {
    fn of(kv: &KeyValue) -> Entry {
        Entry {
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        }
    }
}

/// Publishes the view `update` makes. A new range is made into a view before it
/// replaces the old one, so readers never wait while it is built.
fn publish(view: &watch::Sender<View>, update: Update) {
    match update {
        Update::Snapshot { kvs, revision } => {
            view.send_replace(View::of(&kvs, revision));
        }
        Update::Events(events) => view.send_modify(|view| {
            for event in &events {
                view.apply_event(event);
            }
        }),
    }
}

/// Applies every update of `follower` to the published view, until etcd refuses the
/// watch for good (then the view is marked stopped) or the cache is dropped.
async fn keep_current(mut follower: Follower, view: watch::Sender<View>) {
    loop {
        match follower.next().await {
            Ok(update) => publish(&view, update),
            Err(error) => {
                tracing::warn!(%error, "read cache stopped; transactions read from etcd");
                view.send_modify(|view| *view = View::default());
                return;
            }
        }
    }
}
