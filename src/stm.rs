//! Software transactional memory over etcd: [`Stm`] runs a closure as an optimistic
//! transaction, re-running it on conflict.

mod commit;
mod isolation;
mod requests;
mod txn;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{Client, GetResponse};

use self::commit::{CopyNeeds, Outcome};
pub use self::isolation::Isolation;
use self::requests::read_many;
pub use self::txn::StmTxn;
use crate::error::{ETCD_MAX_TXN_OPS, Error, Result};
use crate::read_cache::ReadCache;
use crate::retry::Backoff;
use crate::session::DEFAULT_REQUEST_TIMEOUT;

/// How many times [`Stm::run`] runs a transaction by default before giving up; a run
/// whose snapshot etcd compacted does not count (see [`Stm::max_attempts`]). Go's STM has
/// no such limit: it runs the transaction again until it commits or its context ends.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 32;
/// How many times a conflicting transaction runs again at once, with the values the failed
/// commit read (as Go does); after that, each retry backs off first and reads them again.
const IMMEDIATE_RETRIES: u32 = 1;
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
    /// A put of the value, attached to the lease (0: none).
    Put {
        value: Vec<u8>,
        lease_id: i64,
    },
    Delete,
}

impl Stm {
    /// Transactions over `client`, at [`Isolation::SerializableSnapshot`], with at most
    /// [`DEFAULT_MAX_ATTEMPTS`] (32) attempts. No request is sent until [`run`](Self::run).
    /// Go's `concurrency.NewSTM` takes the client and its options in one call, and runs the
    /// transaction there.
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
    /// not, the attempt reads from etcd, through its leader (a linearizable read) at every
    /// level.
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
    /// (default 5 s; zero makes [`run`](Self::run) return [`Error::InvalidArgument`]). Go
    /// bounds its requests with the context of `WithAbortContext` instead.
    #[must_use = "returns the Stm with this setting"]
    pub fn request_timeout(mut self, timeout: Duration) -> Stm {
        self.request_timeout = timeout;
        self
    }

    /// Runs `apply` as a transaction and returns its output once its writes are committed.
    /// With [`new`](Self::new), Go's `concurrency.NewSTM(client, apply)`, which returns
    /// the commit's `TxnResponse` where this returns `apply`'s output
    /// ([`run_with_revision`](Self::run_with_revision) also returns the commit's revision).
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
    ///   does. A read-only transaction may read any number of keys (checked 128 to a Txn:
    ///   with `--max-txn-ops` set below that, one that reads more fails the same way).
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
    pub async fn run<T, E, F>(&self, apply: F) -> Result<T, E>
    where
        F: AsyncFnMut(&mut StmTxn) -> Result<T, E>,
        E: From<Error>,
    {
        Ok(self.run_with_revision(apply).await?.0)
    }

    /// [`run`](Self::run), returning with `apply`'s output the revision the transaction
    /// took effect at (an `i64`): its commit's, as in the `Header.Revision` of the
    /// `TxnResponse` that Go's `NewSTM` returns. For a transaction that wrote nothing, a
    /// revision at which all its reads held: that of the check that ended it, or of its
    /// snapshot; or 0 where it fixed no such revision (at [`Isolation::ReadCommitted`], or
    /// at the snapshot levels when it neither read nor prefetched anything), which is no
    /// revision to watch from. For instance, to watch a key from just after a write:
    ///
    /// ```no_run
    /// use etcd_concurrency::{Error, Stm};
    /// # async fn example(stm: Stm) -> Result<(), Error> {
    /// let (_, revision) = stm
    ///     .run_with_revision(async |tx| {
    ///         tx.put("/config/mode", "maintenance");
    ///         Ok::<_, Error>(())
    ///     })
    ///     .await?;
    /// println!("written at revision {revision}; later changes start at {}", revision + 1);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`run`](Self::run).
    ///
    /// # Cancel safety
    ///
    /// As [`run`](Self::run).
    ///
    /// # Panics
    ///
    /// As [`run`](Self::run).
    pub async fn run_with_revision<T, E, F>(&self, mut apply: F) -> Result<(T, i64), E>
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
                behind_own_write: false,
                snapshot_from_any_member: false,
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
            let pinned_at = txn.snapshot;
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
                    // Nothing sent at the end: the snapshot's reads held at its revision.
                    let revision = match revision {
                        0 => pinned_at.unwrap_or(0),
                        sent => sent,
                    };
                    return Ok((output, revision));
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
