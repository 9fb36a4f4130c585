//! Software transactional memory over etcd: [`Stm`] runs a closure as an optimistic
//! transaction, re-running it on conflict.

mod isolation;
mod requests;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, GetResponse, Txn, TxnOp, TxnOpResponse};

pub use self::isolation::Isolation;
use self::requests::{
    commit_once, gets, mod_revisions_at, read_many, read_set, unless_values_too_large,
};
use crate::error::{ETCD_MAX_TXN_OPS, Error, Result, is_compacted, is_future_revision};
use crate::read_cache::{ReadCache, View};
use crate::retry::{Backoff, retry, retry_read_txn};
use crate::session::DEFAULT_REQUEST_TIMEOUT;

/// How many times [`Stm::run`] runs a transaction by default before giving up; a run
/// whose snapshot etcd compacted does not count (see [`Stm::max_attempts`]). Go's STM has
/// no such limit: it runs the transaction again until it commits or its context ends.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 32;
/// How many times a conflicting transaction runs again at once, with the values the failed
/// commit read (as Go does); after that, each retry backs off first and reads them again.
const IMMEDIATE_RETRIES: u32 = 1;
/// How long an attempt waits for the cache to show the last write made through it, or a
/// change to a key under the prefix that a failed commit or check found, before reading
/// etcd instead (a copy without the write would be read stale for sure: a conflict, or at
/// ReadCommitted, which checks nothing, a read that misses the write). Either is an
/// event under the cache's prefix, so only a broken watch makes the wait run out, but for
/// a deletion the copy had not yet shown when the check ended: its revision is not known,
/// so the copy must reach the check's, which on a quiet prefix it does not. (A change
/// outside the prefix is no event of the copy's: it is not waited for, see [`CopyNeeds`].)
const CATCH_UP_LIMIT: Duration = Duration::from_millis(100);
/// The back-off then: jittered, from 2 ms doubling up to 100 ms.
const CONFLICT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(2), Duration::from_millis(100));

/// Runs closures as transactions over etcd keys: optimistic, re-run on conflict. Mirrors
/// Go's `concurrency.NewSTM`.
///
/// The closure reads with [`StmTxn::get`] and buffers writes with [`StmTxn::put`] /
/// [`StmTxn::delete`]; when it returns `Ok`, one Txn commits the writes if the reads are
/// still valid for the [`Isolation`] level. If not, the closure runs again at once with
/// fresh values, read in the same Txn that failed, so the next attempt starts without a
/// round trip. After repeated conflicts, attempts back off (jittered, 2 ms doubling up to
/// 100 ms) and read the values again after the pause.
///
/// `Stm` is a cheap [`Clone`] handle holding a client and options. To read a hot key range
/// without round trips, give it a [`ReadCache`].
///
/// # Retries
///
/// The closure may run several times, and must be idempotent apart from its effect
/// through the transaction: no side effects that must happen once. Only the last run's
/// writes are committed, and only its output is returned.
///
/// # Example: moving money between accounts
///
/// ```no_run
/// use etcd_concurrency::{Error, Stm};
///
/// # async fn example(client: etcd_client::Client) -> Result<(), Error> {
/// let stm = Stm::new(client);
/// stm.run(async |tx| {
///     let from: u64 = parse(tx.get("/accounts/alice").await?);
///     let to: u64 = parse(tx.get("/accounts/bob").await?);
///     tx.put("/accounts/alice", (from - 10).to_string());
///     tx.put("/accounts/bob", (to + 10).to_string());
///     Ok::<_, Error>(())
/// })
/// .await?;
/// # Ok(())
/// # }
/// # fn parse(value: Option<Vec<u8>>) -> u64 {
/// #     value.map_or(0, |v| String::from_utf8(v).unwrap().parse().unwrap())
/// # }
/// ```
#[derive(Clone)]
pub struct Stm {
    client: Arc<Client>,
    isolation: Isolation,
    prefetch: Vec<Vec<u8>>,
    max_attempts: u32,
    request_timeout: Duration,
    cache: Option<ReadCache>,
    /// The newest revision a commit Txn, or a check of keys read, through this handle (or
    /// its clones) was answered at, committed or not.
    seen: Arc<AtomicI64>,
}

/// One attempt of an [`Stm`] transaction: its reads and buffered writes (Go's `STM`
/// interface).
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
    kv: Arc<Client>,
    isolation: Isolation,
    request_timeout: Duration,
    /// Keys read in this attempt (the read set).
    reads: HashMap<Vec<u8>, Read>,
    /// Keys whose read failed or was dropped in this attempt, and not read since.
    unread: HashSet<Vec<u8>>,
    /// Fresh values handed over from a failed commit or the prefetch, used on first read.
    fresh: Fresh,
    writes: HashMap<Vec<u8>, Write>,
    /// The revision reads are pinned to, for the snapshot levels.
    snapshot: Option<i64>,
    /// A pinned read found its revision compacted (etcd's answer): this attempt cannot go
    /// on and must not commit; the next one starts from a fresh read.
    compacted: Option<tonic::Status>,
    /// The cache this attempt may read: none once a compaction left it behind.
    cache: Option<ReadCache>,
    /// The `Stm`'s cache, told of a commit that changes a key under its prefix even when
    /// this attempt does not read it (after a compaction).
    noted_in: Option<ReadCache>,
    /// The cache as this attempt took it, at its first read of a key the cache holds.
    view: Option<View>,
    /// The newest revision this Stm had seen when the attempt began: an attempt that read
    /// the cache checks its blind writes from no earlier.
    seen: i64,
    /// Changes found by an earlier attempt's check, whose values it could not hand over:
    /// a copy that does not show them yet is not read.
    copy_needs: CopyNeeds,
}

/// How a commit ended.
enum Outcome {
    /// Committed at `revision` (0 if there was nothing to commit).
    Committed { revision: i64 },
    /// The reads were no longer valid: the fresh values of the read set (and of the
    /// prefetch keys), read by the failed Txn.
    Conflict(Fresh),
    /// The reads were no longer valid, and no values came back: a read-only check found a
    /// change among more keys than one Txn compares, or a failed Txn's values were too
    /// large to read back. `needs`: where the copy of the `ReadCache` must be to show the
    /// changes; `checked_at`: the revision the keys were checked at.
    Changed { needs: CopyNeeds, checked_at: i64 },
    /// A read-only check's follow-up reads found its revision compacted (etcd's answer):
    /// the attempt runs again, as after a compacted snapshot.
    Compacted(etcd_client::Error),
}

/// Where the copy of a `ReadCache` must be before an attempt reads it, after a check found
/// changes without their values (0: anywhere).
#[derive(Clone, Copy, Debug, Default)]
struct CopyNeeds {
    /// The newest change to a key under the prefix: its event brings the copy there, so an
    /// attempt waits for it, up to [`CATCH_UP_LIMIT`].
    shown: i64,
    /// At the snapshot levels, the newest change to a key outside the prefix, which an
    /// attempt pinned to the copy's revision would read stale. The copy passes it only
    /// when something under the prefix changes later, so an attempt does not wait for it:
    /// it reads from etcd unless the copy is past it already.
    passed: i64,
}

impl CopyNeeds {
    fn max(self, other: CopyNeeds) -> CopyNeeds {
        CopyNeeds {
            shown: self.shown.max(other.shown),
            passed: self.passed.max(other.passed),
        }
    }
}

/// Values read together in one Txn, at `revision`.
#[derive(Debug, Default)]
struct Fresh {
    values: HashMap<Vec<u8>, Read>,
    revision: i64,
}

#[derive(Debug, Clone)]
struct Read {
    value: Option<Vec<u8>>,
    /// 0 when the key is absent.
    mod_revision: i64,
}

#[derive(Debug, Clone)]
enum Write {
    Put(Vec<u8>),
    Delete,
}

impl Stm {
    /// Transactions over `client`, at [`Isolation::SerializableSnapshot`], with at most
    /// [`DEFAULT_MAX_ATTEMPTS`] (32) attempts. No request is sent until [`run`](Self::run).
    ///
    /// ```no_run
    /// use etcd_concurrency::{Isolation, Stm};
    /// # fn example(client: etcd_client::Client) {
    /// let stm = Stm::new(client)
    ///     .isolation(Isolation::RepeatableReads)
    ///     .prefetch(["/accounts/alice", "/accounts/bob"])
    ///     .max_attempts(8);
    /// # }
    /// ```
    pub fn new(client: Client) -> Stm {
        Stm {
            client: Arc::new(client),
            isolation: Isolation::default(),
            prefetch: Vec::new(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            cache: None,
            seen: Arc::default(),
        }
    }

    /// The isolation level (Go's `WithIsolation`).
    #[must_use = "returns the Stm with this setting"]
    pub fn isolation(mut self, isolation: Isolation) -> Stm {
        self.isolation = isolation;
        self
    }

    /// Keys to read in one request before the first attempt, when the closure is known to
    /// read them (Go's `WithPrefetch`): saves a round trip per key. Only keys the closure
    /// actually reads join the read set (in Go every prefetched key does, so a write to one
    /// the closure never used is a conflict there, and not here). They are read in one Txn:
    /// at most etcd's `--max-txn-ops` (128 by default) keys, or every run fails with etcd's
    /// error. If their values are over the client's answer size limit together (4 MiB by
    /// default), the closure reads them one by one instead. At the snapshot levels,
    /// prefetched values fix the attempt's snapshot, so it does not read a [`ReadCache`].
    /// An empty key makes [`run`](Self::run) return [`Error::InvalidArgument`] before
    /// sending anything.
    #[must_use = "returns the Stm with this setting"]
    pub fn prefetch<K: Into<Vec<u8>>>(mut self, keys: impl IntoIterator<Item = K>) -> Stm {
        self.prefetch = keys.into_iter().map(Into::into).collect();
        self
    }

    /// Reads keys under the cache's prefix from `cache` instead of etcd: no round trip per
    /// read. Except at [`Isolation::ReadCommitted`], which checks nothing, commits still
    /// check every key read against etcd, so a stale copy costs a conflict, never a wrong
    /// commit; see [`ReadCache`] for when it pays.
    ///
    /// At the snapshot levels, an attempt reads from the cache only if its snapshot is not
    /// pinned yet (its first read is of a cached key, and no prefetched or handed-over
    /// values fix it), and then reads every cached key from that one revision.
    /// The retry right after a conflict uses the values read by the failed commit, as
    /// without a cache; after later conflicts and their back-off, attempts read from the
    /// cache again if it holds all those keys and has caught up with their values, and
    /// from etcd if not (in one Txn, as without a cache, rather than a round trip for each
    /// key outside the cache's prefix).
    ///
    /// Reads your writes: before taking the cache, an attempt waits (at most 100 ms, which
    /// only a broken watch uses up) until the cache shows the latest commit that changed a
    /// key under its prefix, made through any `Stm` reading that cache; if it still does
    /// not, the attempt reads from etcd.
    ///
    /// Nothing in Go's `concurrency` package does this; see [`ReadCache`].
    #[must_use = "returns the Stm with this setting"]
    pub fn read_cache(mut self, cache: ReadCache) -> Stm {
        self.cache = Some(cache);
        self
    }

    /// How many runs of the closure may conflict: the last of them returns
    /// [`Error::TooManyConflicts`] (default [`DEFAULT_MAX_ATTEMPTS`]; zero makes
    /// [`run`](Self::run) return [`Error::InvalidArgument`]). A run whose snapshot etcd
    /// compacted (see [`StmTxn::get`]) does not count. Go retries without limit.
    #[must_use = "returns the Stm with this setting"]
    pub fn max_attempts(mut self, attempts: u32) -> Stm {
        self.max_attempts = attempts;
        self
    }

    /// How long each read (and the check that ends a read-only transaction) is retried on
    /// transient failures (member down, leader change), and how long the commit may wait
    /// for its answer; the commit is sent again only when etcd certainly did not apply it
    /// (default 5 s; not zero, which [`run`](Self::run) refuses). Go bounds its requests
    /// with the context of `WithAbortContext` instead.
    #[must_use = "returns the Stm with this setting"]
    pub fn request_timeout(mut self, timeout: Duration) -> Stm {
        self.request_timeout = timeout;
        self
    }

    /// Runs `apply` as a transaction and returns its output once its writes are committed.
    /// With [`new`](Self::new), Go's `concurrency.NewSTM(client, apply)`, which returns
    /// the commit's `TxnResponse` where this returns `apply`'s output.
    ///
    /// `apply` gets the attempt's [`StmTxn`]; returning `Err` aborts the transaction:
    /// nothing is written, and the error is returned as is. The error type is yours, as
    /// long as this crate's [`Error`] converts into it (for `?` on reads). The compiler
    /// cannot infer it from a bare `Ok(())` (error E0283, even where `run`'s result meets a
    /// `?`), so name it in the closure: `Ok::<_, Error>(())`, or your own type.
    ///
    /// `apply` is an async closure, `async |tx| { ... }` (Rust 1.85), not a closure that
    /// returns an `async` block (`|tx| async move { ... }`): the block could not borrow
    /// `tx`, so the compiler rejects it (asking for type annotations, then for a longer
    /// lifetime).
    ///
    /// # Errors
    ///
    /// - `apply`'s own error, unchanged; nothing is written. Except after a read that hit
    ///   a compacted snapshot: the attempt runs again whatever `apply` returned, since its
    ///   error most likely is that read's (converted into `E`).
    /// - [`Error::InvalidArgument`] (converted into `E`): the request timeout or
    ///   [`max_attempts`](Self::max_attempts) is zero, or a [`prefetch`](Self::prefetch)
    ///   key is empty, and `apply` does not run; or `apply` wrote to an empty key, or read
    ///   one and returned `Ok` anyway, and nothing is written.
    /// - [`Error::TooManyConflicts`] (converted into `E`): every attempt conflicted;
    ///   nothing is written.
    /// - [`Error::Etcd`] / [`Error::Timeout`] (converted into `E`): a read failed (also
    ///   when `apply` went on without it and failed to read it again: see
    ///   [`StmTxn::get`]), or the commit failed or got no answer. If
    ///   [`Error::is_transient`] is true for a failed commit, it may or may not have been
    ///   applied; retrying the whole run may apply it twice. So may a commit refused with
    ///   etcd's "mvcc: database space exceeded", which is not transient: etcd applies the
    ///   write that crosses its backend quota, then answers it with that error. A request
    ///   over etcd's size limit (1.5 MiB by default) fails here too, and so does a commit
    ///   of more than etcd's `--max-txn-ops` (128 by default) compares or writes: it
    ///   compares each key read (and, at the default level, each key only written), as Go's
    ///   does. A read-only transaction may read any number of keys.
    /// - [`Error::Etcd`] (converted into `E`) with etcd's "compacted" error: the snapshot
    ///   was compacted in more runs in a row than `max_attempts`.
    ///
    /// # Retries
    ///
    /// See the type's docs: `apply` may run several times.
    ///
    /// # Running again after an unknown outcome
    ///
    /// A run that failed with a transient error (a member restarted or removed, a lost
    /// connection) may have committed. To make it safe to run again, let the transaction
    /// write a marker of its own and return early when it finds the marker: a run that
    /// committed left it, so running again commits nothing twice. At every level but
    /// [`Isolation::ReadCommitted`], the marker's read is checked at commit like any
    /// other, so two runs cannot both miss it. Markers stay until deleted (say, by a
    /// clean-up of old ones).
    ///
    /// ```no_run
    /// use etcd_concurrency::{Error, Stm};
    ///
    /// /// Moves `amount` from alice to bob at most once for `id`, trying up to 3 times.
    /// async fn transfer(stm: Stm, id: String, amount: u64) -> Result<(), Error> {
    ///     let mut tries = 3;
    ///     loop {
    ///         let marker = format!("/transfers/{id}");
    ///         let outcome: Result<(), Error> = stm
    ///             .run(async move |tx| {
    ///                 if tx.get(&marker).await?.is_some() {
    ///                     return Ok(()); // an earlier run committed it
    ///                 }
    ///                 let alice = balance(tx.get("/accounts/alice").await?);
    ///                 let bob = balance(tx.get("/accounts/bob").await?);
    ///                 let moved = amount.min(alice);
    ///                 tx.put("/accounts/alice", (alice - moved).to_string());
    ///                 tx.put("/accounts/bob", (bob + moved).to_string());
    ///                 tx.put(marker.as_str(), moved.to_string());
    ///                 Ok(())
    ///             })
    ///             .await;
    ///         tries -= 1;
    ///         match outcome {
    ///             Err(error) if error.is_transient() && tries > 0 => continue,
    ///             outcome => return outcome,
    ///         }
    ///     }
    /// }
    ///
    /// fn balance(value: Option<Vec<u8>>) -> u64 {
    ///     value.map_or(0, |v| String::from_utf8_lossy(&v).parse().unwrap_or(0))
    /// }
    /// # fn spawned(stm: Stm) {
    /// # tokio::spawn(transfer(stm, "t-1".into(), 10));
    /// # }
    /// ```
    ///
    /// # In spawned tasks
    ///
    /// Today's compiler cannot prove a task `Send` when it calls `run` with an async
    /// closure that captures references (rust-lang/rust#139475), even to a `Copy` value
    /// such as a `u64`, which a closure without `move` borrows. The error points at the
    /// `tokio::spawn` call, not at the closure: "implementation of `Send` is not general
    /// enough", naming `&Stm`, `&str` or another reference. In a task given to
    /// `tokio::spawn`, make the closure `async move` and let it own what it uses:
    ///
    /// ```no_run
    /// # use etcd_concurrency::{Error, Stm};
    /// # fn example(stm: Stm) {
    /// let key = String::from("/counters/visits");
    /// tokio::spawn(async move {
    ///     stm.run(async move |tx| {
    ///         let visits: u64 = tx.get(&key).await?.map_or(0, |v| v[0].into());
    ///         tx.put(key.as_str(), vec![(visits + 1) as u8]);
    ///         Ok::<_, Error>(())
    ///     })
    ///     .await
    /// });
    /// # }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes abandons the transaction. Nothing is
    /// written unless the commit request was already sent, in which case it may or may
    /// not apply.
    ///
    /// # Panics
    ///
    /// If `apply` panics: the panic propagates. Also outside a Tokio runtime, or in one
    /// without its time driver (see the crate docs).
    pub async fn run<T, E, F>(&self, mut apply: F) -> Result<T, E>
    where
        F: AsyncFnMut(&mut StmTxn) -> Result<T, E>,
        E: From<Error>,
    {
        if self.request_timeout.is_zero() {
            let why = "a request timeout of zero would fail every request".into();
            return Err(Error::InvalidArgument(why).into());
        }
        if self.max_attempts == 0 {
            let why = "max_attempts of zero would allow no attempt".into();
            return Err(Error::InvalidArgument(why).into());
        }
        if self.prefetch.iter().any(Vec::is_empty) {
            return Err(empty_key().into());
        }
        let kv = &self.client;
        let mut fresh = if self.prefetch.is_empty() {
            Fresh::default()
        } else {
            let keys = self.prefetch.clone();
            read_many(kv, self.request_timeout, keys).await?
        };
        let (first, max) = CONFLICT_BACKOFF;
        let mut backoff = Backoff::with_steps(first, max);
        let mut cache = self.cache.clone();
        let (mut conflicts, mut compactions) = (0, 0);
        let mut copy_needs = CopyNeeds::default();
        loop {
            // Reads pinned to a snapshot use the fresh values' revision, so that an attempt
            // never mixes them with newer reads.
            let snapshot =
                (self.isolation.snapshot_reads() && fresh.revision > 0).then_some(fresh.revision);
            let mut txn = StmTxn {
                kv: kv.clone(),
                isolation: self.isolation,
                request_timeout: self.request_timeout,
                reads: HashMap::new(),
                unread: HashSet::new(),
                fresh: std::mem::take(&mut fresh),
                writes: HashMap::new(),
                snapshot,
                compacted: None,
                cache: cache.clone(),
                noted_in: self.cache.clone(),
                view: None,
                seen: self.seen.load(Ordering::Relaxed),
                copy_needs,
            };
            let output = apply(&mut txn).await;
            if let Some(compaction) = txn.compacted {
                compactions += 1;
                if compactions > self.max_attempts {
                    return Err(Error::Etcd(etcd_client::Error::GRpcStatus(compaction)).into());
                }
                if txn.view.is_some() {
                    // The cache's revision is compacted (it lags, its watch broken): it
                    // would pin the next attempt there again.
                    cache = None;
                }
                // Whatever the closure made of the read's error, run it again afresh.
                tracing::debug!(compactions, "STM snapshot compacted; running again");
                continue;
            }
            let output = output?;
            if txn.unread.contains(b"".as_slice()) {
                return Err(empty_key().into());
            }
            let outcome = if txn.unread.is_empty() {
                Box::pin(txn.commit(&self.prefetch)).await?
            } else {
                // The closure went on without a read that failed: its writes may rest on a
                // value it never saw. As in Go, where a failed read aborts the attempt, it
                // does not commit; the keys are read now (as many as one Txn may hold), and
                // an error ends the run.
                let keys = txn.unread.into_iter().take(ETCD_MAX_TXN_OPS).collect();
                Outcome::Conflict(read_many(kv, self.request_timeout, keys).await?)
            };
            match outcome {
                Outcome::Committed { revision } => {
                    self.seen.fetch_max(revision, Ordering::Relaxed);
                    return Ok(output);
                }
                Outcome::Conflict(values) => {
                    self.seen.fetch_max(values.revision, Ordering::Relaxed);
                    fresh = values;
                }
                // The next attempts must not read that key from a copy that lags again.
                Outcome::Changed { needs, checked_at } => {
                    self.seen.fetch_max(checked_at, Ordering::Relaxed);
                    copy_needs = copy_needs.max(needs);
                }
                Outcome::Compacted(compaction) => {
                    compactions += 1;
                    if compactions > self.max_attempts {
                        return Err(Error::Etcd(compaction).into());
                    }
                    tracing::debug!(compactions, "STM check compacted; running again");
                    continue;
                }
            }
            compactions = 0;
            conflicts += 1;
            if conflicts == self.max_attempts {
                return Err(Error::TooManyConflicts {
                    attempts: self.max_attempts,
                }
                .into());
            }
            tracing::debug!(conflicts, "STM conflict; running again");
            if conflicts > IMMEDIATE_RETRIES {
                // Values read before a pause would be stale after it: take them from the
                // cache if it holds them all and has caught up with them meanwhile, or
                // read them again.
                backoff.wait().await;
                fresh = match &cache {
                    Some(cache) if fresh.seen_by(cache) => Fresh::default(),
                    behind => {
                        if behind.is_some() {
                            tracing::debug!(
                                "cache copy behind the values a failed commit read; \
                                 reading them from etcd"
                            );
                        }
                        let keys = fresh.values.into_keys().collect();
                        read_many(kv, self.request_timeout, keys).await?
                    }
                };
            }
        }
    }
}

impl fmt::Debug for Stm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stm")
            .field("isolation", &self.isolation)
            .field("prefetch", &self.prefetch.len())
            .field("max_attempts", &self.max_attempts)
            .field("request_timeout", &self.request_timeout)
            .field("read_cache", &self.cache)
            .finish_non_exhaustive()
    }
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
    /// returns `Ok` makes [`Stm::run`] return it too, and nothing is written).
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
    /// never saw. The key is then read again: if that fails too, [`Stm::run`] returns the
    /// error; if not, the closure runs again with the value, which counts as a conflict.
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
                Write::Put(value) => Some(value.clone()),
                Write::Delete => None,
            });
        }
        Ok(self.read(key).await?.value.clone())
    }

    /// Buffers a write of `value` to `key`, committed with the transaction. Go's `STM.Put`,
    /// without its options (such as a lease). An empty `key` makes [`Stm::run`] return
    /// [`Error::InvalidArgument`] instead of committing: nothing is written.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.writes.insert(key.into(), Write::Put(value.into()));
    }

    /// Buffers a deletion of `key`, committed with the transaction. Go's `STM.Del`. An
    /// empty `key` makes [`Stm::run`] return [`Error::InvalidArgument`] instead of
    /// committing: nothing is written.
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
    /// it does not commit (see [`Stm::run`]).
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
            let behind = if view.revision < needs.shown {
                Some("cache copy behind a change a check found; reading from etcd")
            } else if view.revision < written {
                // A copy that does not show a write made through it would be read stale
                // for sure: conflicting, or at ReadCommitted not reading that write.
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
            // The first read of a snapshot level: linearizable; it fixes the snapshot.
            (true, None) => GetOptions::new(),
            (true, Some(revision)) => GetOptions::new()
                .with_revision(revision)
                .with_serializable(),
            (false, _) => GetOptions::new().with_serializable(),
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
        retry(&self.kv, self.request_timeout, |client| {
            let (mut kv, key, options) = (client.kv_client(), key.to_vec(), options.clone());
            async move { kv.get(key, Some(options)).await }
        })
        .await
    }

    /// Commits the writes if the reads are still valid; see [`Outcome`].
    async fn commit(self, prefetch: &[Vec<u8>]) -> Result<Outcome> {
        if self.writes.contains_key(&[][..]) {
            return Err(empty_key());
        }
        if self.writes.is_empty() {
            let checked_anyway = match self.isolation {
                Isolation::RepeatableReads => true,
                Isolation::ReadCommitted => false,
                // One revision, consistent as it is, and current if read from etcd; a
                // cached one may be behind, so the check makes it current.
                Isolation::SerializableSnapshot | Isolation::Serializable => self.view.is_some(),
            };
            return match checked_anyway {
                true => self.check_reads(prefetch).await,
                false => Ok(Outcome::Committed { revision: 0 }),
            };
        }
        let mut conditions = Vec::new();
        if self.isolation != Isolation::ReadCommitted {
            conditions.extend(self.reads.iter().map(|(key, read)| unchanged(key, read)));
        }
        if self.isolation == Isolation::SerializableSnapshot {
            if let Some(snapshot) = self.snapshot {
                // The copy's revision moves only with changes under its prefix, so it may
                // be older than this Stm's own last commit. Any revision from the snapshot
                // to the commit will do here, as the commit checks every read through it:
                // take the newest this Stm has seen, so that its own earlier writes do not
                // count as concurrent ones.
                let since = match self.view {
                    Some(_) => snapshot.max(self.seen),
                    None => snapshot,
                };
                // A key also read is covered already: its read compare pins a mod revision
                // at or below the snapshot.
                let blind = self
                    .writes
                    .keys()
                    .filter(|key| !self.reads.contains_key(*key));
                for key in blind {
                    let untouched = Compare::mod_revision(key.clone(), CompareOp::Less, since + 1);
                    conditions.push(untouched);
                }
            }
        }
        let (writes, cached): (Vec<TxnOp>, Vec<bool>) = self
            .writes
            .into_iter()
            .map(|(key, write)| {
                let cached = self
                    .noted_in
                    .as_ref()
                    .is_some_and(|cache| cache.covers(&key));
                let op = match write {
                    Write::Put(value) => TxnOp::put(key, value, None),
                    Write::Delete => TxnOp::delete(key, None),
                };
                (op, cached)
            })
            .unzip();
        let refresh = refresh_keys(self.reads.keys(), prefetch);
        let txn = Txn::new()
            .when(conditions)
            .and_then(writes)
            .or_else(gets(&refresh));
        let (kv, limit) = (&self.kv, self.request_timeout);
        let Some(answer) = unless_values_too_large(commit_once(kv, limit, txn).await)? else {
            let read = |key: &[u8]| self.reads.get(key).map(|read| read.mod_revision);
            let pinned = self.isolation.snapshot_reads();
            return newest_changes(kv, limit, &refresh, read, &self.noted_in, pinned).await;
        };
        if !answer.succeeded() {
            return Ok(Outcome::Conflict(read_set(refresh, &answer)));
        }
        let revision = answer.header().map_or(0, |h| h.revision());
        if let Some(cache) = &self.noted_in {
            // Only a write that changed a key under the prefix shows in the copy: not the
            // delete of an absent key.
            let changed = answer
                .op_responses()
                .into_iter()
                .zip(cached)
                .any(|(op, cached)| {
                    cached
                        && match op {
                            TxnOpResponse::Put(_) => true,
                            TxnOpResponse::Delete(deleted) => deleted.deleted() > 0,
                            _ => false,
                        }
                });
            if changed {
                cache.wrote(revision);
            }
        }
        Ok(Outcome::Committed { revision })
    }

    /// Checks that a read-only attempt's reads are still current, with read-only Txns
    /// (which etcd answers without a raft write): one that compares up to
    /// [`ETCD_MAX_TXN_OPS`] keys, and for any further keys, reads of their mod revisions
    /// at the revision it was answered at, compared here (their values could exceed one
    /// answer). If all match, the reads were current at that revision.
    async fn check_reads(self, prefetch: &[Vec<u8>]) -> Result<Outcome> {
        let reads: Vec<(Vec<u8>, Read)> = self.reads.into_iter().collect();
        let (compared, rest) = reads.split_at(reads.len().min(ETCD_MAX_TXN_OPS));
        let refresh = refresh_keys(compared.iter().map(|(key, _)| key), prefetch);
        let conditions: Vec<Compare> = compared
            .iter()
            .map(|(key, read)| unchanged(key, read))
            .collect();
        let txn = Txn::new().when(conditions).or_else(gets(&refresh));
        // Read-only: safe to send again whatever became of an attempt.
        let (kv, limit) = (&self.kv, self.request_timeout);
        let pinned = self.isolation.snapshot_reads();
        let Some(answer) = unless_values_too_large(retry_read_txn(kv, limit, txn).await)? else {
            let read = |key: &[u8]| {
                let read = compared.iter().find(|(read, _)| read.as_slice() == key);
                read.map(|(_, read)| read.mod_revision)
            };
            return newest_changes(kv, limit, &refresh, read, &self.noted_in, pinned).await;
        };
        if !answer.succeeded() {
            return Ok(Outcome::Conflict(read_set(refresh, &answer)));
        }
        let revision = answer.header().map_or(0, |h| h.revision());
        for chunk in rest.chunks(ETCD_MAX_TXN_OPS) {
            let keys = chunk.iter().map(|(key, _)| key.as_slice());
            let now = match mod_revisions_at(&self.kv, self.request_timeout, keys, revision).await {
                Ok((now, _)) => now,
                // Compacted meanwhile: a fresh attempt checks again.
                Err(Error::Etcd(error)) if is_compacted(&error) => {
                    return Ok(Outcome::Compacted(error));
                }
                Err(error) => return Err(error),
            };
            let mut changed: Option<CopyNeeds> = None;
            for ((key, read), now) in chunk.iter().zip(now) {
                if now == read.mod_revision {
                    continue;
                }
                let needs = copy_must_show(
                    &self.noted_in,
                    key,
                    read.mod_revision,
                    now,
                    revision,
                    pinned,
                );
                changed = Some(changed.unwrap_or_default().max(needs));
            }
            if let Some(needs) = changed {
                return Ok(Outcome::Changed {
                    needs,
                    checked_at: revision,
                });
            }
        }
        Ok(Outcome::Committed { revision })
    }
}

/// The compare that `key` still has the mod revision it was read with.
fn unchanged(key: &[u8], read: &Read) -> Compare {
    Compare::mod_revision(key, CompareOp::Equal, read.mod_revision)
}

/// The keys a failed commit reads for the next attempt: those read, then the prefetch keys
/// not read, as many as one Txn may hold.
fn refresh_keys<'a>(
    reads: impl Iterator<Item = &'a Vec<u8>>,
    prefetch: &[Vec<u8>],
) -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = reads.cloned().collect();
    let unread: Vec<Vec<u8>> = prefetch
        .iter()
        .filter(|key| !keys.contains(key))
        .cloned()
        .collect();
    keys.extend(unread);
    keys.truncate(ETCD_MAX_TXN_OPS);
    keys
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

impl Fresh {
    /// Whether the next attempt can read `cache` instead of these values: the cache holds
    /// every one of their keys, and its copy has reached every change they show. A key the
    /// cache does not hold would be read from etcd, a round trip each, one after another
    /// (at the snapshot levels, at the copy's revision), where reading them all again
    /// takes one Txn and leaves the attempt's check one round trip behind its reads: under
    /// contention, the attempt back on the copy would conflict again and again. A key now
    /// absent may have been deleted as late as these values' revision; a copy that holds
    /// no such key agrees with them already.
    fn seen_by(&self, cache: &ReadCache) -> bool {
        if !self.values.keys().all(|key| cache.covers(key)) {
            return false;
        }
        let view = cache.view();
        let holds_none = |key: &[u8]| {
            view.as_ref()
                .is_some_and(|view| view.mod_revision(key) == 0)
        };
        let newest = self
            .values
            .iter()
            .map(|(key, read)| match read.value {
                Some(_) => read.mod_revision,
                None if holds_none(key) => 0,
                None => self.revision,
            })
            .max();
        newest.is_none_or(|newest| cache.revision() >= newest)
    }
}

impl Read {
    fn from_answer(answer: &GetResponse) -> Read {
        match answer.kvs().first() {
            Some(kv) => Read {
                value: Some(kv.value().to_vec()),
                mod_revision: kv.mod_revision(),
            },
            None => Read {
                value: None,
                mod_revision: 0,
            },
        }
    }
}

/// etcd refuses an empty key ("key is not provided"); this says so before asking.
fn empty_key() -> Error {
    Error::InvalidArgument("an STM key must not be empty".into())
}

/// For a failed Txn whose values were too large to read back: where `cache`'s copy must be
/// before the next attempt reads from it (see [`copy_must_show`]), from the
/// mod revisions of `keys` read now without values and those the attempt read (`read`:
/// none for a key it did not read, such as a prefetch key, which cannot have failed the
/// Txn). If none of them changed, the Txn failed on a key it only wrote: the revision they
/// were checked at, which this `Stm` then has seen, lets the next attempt's check of that
/// key start there.
async fn newest_changes(
    kv: &Client,
    limit: Duration,
    keys: &[Vec<u8>],
    read: impl Fn(&[u8]) -> Option<i64>,
    cache: &Option<ReadCache>,
    pinned: bool,
) -> Result<Outcome> {
    let latest = 0;
    let asked = keys.iter().map(Vec::as_slice);
    let (now, revision) = mod_revisions_at(kv, limit, asked, latest).await?;
    let changes = keys.iter().zip(now).filter_map(|(key, now)| {
        let read = read(key).filter(|read| *read != now)?;
        Some(copy_must_show(cache, key, read, now, revision, pinned))
    });
    Ok(Outcome::Changed {
        needs: changes.fold(CopyNeeds::default(), CopyNeeds::max),
        checked_at: revision,
    })
}

/// Where `cache`'s copy must be before an attempt reads `key` through it, `key` having been
/// read with mod revision `read` and having mod revision `now` (0: deleted) at
/// `revision`: at the revision of that change, if the copy holds the key (shown by an
/// event) or, at the snapshot levels (`pinned`), if it does not but is read at the copy's
/// revision (passed without an event of its own); anywhere otherwise (read from etcd, it
/// is current). A deletion's revision is not known, only that it is `revision` at the
/// latest: a copy past `read` that no longer holds the key shows a deletion already (its
/// revision now will do, and reading the key as absent there agrees with etcd); any other
/// must reach `revision`.
fn copy_must_show(
    cache: &Option<ReadCache>,
    key: &[u8],
    read: i64,
    now: i64,
    revision: i64,
    pinned: bool,
) -> CopyNeeds {
    let holder = cache.as_ref().filter(|cache| cache.covers(key));
    let changed_at = match (holder, now) {
        (Some(cache), 0) => match cache.view() {
            Some(view) if view.revision >= read && view.mod_revision(key) == 0 => view.revision,
            _ => revision,
        },
        (_, 0) => revision,
        (_, now) => now,
    };
    match holder {
        Some(_) => CopyNeeds {
            shown: changed_at,
            passed: 0,
        },
        None if pinned => CopyNeeds {
            shown: 0,
            passed: changed_at,
        },
        None => CopyNeeds::default(),
    }
}
