//! Distributed coordination over etcd: sessions, locks, leader election and software
//! transactional memory, built client-side from etcd's Txn, Range, Watch and Lease
//! primitives. The Rust counterpart of etcd's Go package `client/v3/concurrency`, and
//! wire-compatible with it: Go services, `etcdctl lock` and `etcdctl elect` share locks and
//! elections with this crate.
//!
//! [`Session`] holds a lease; [`Mutex`] and [`Election`] queue keys under it; [`Stm`] runs
//! optimistic transactions, and a [`ReadCache`] lets them read a hot key range without
//! round trips. The [`etcd_client`] crate (0.21) it is built on is re-exported: its
//! `Client` is what sessions take, and its `Compare` what guards return for your own
//! `Txn`.
//!
//! # Quick start
//!
//! ```no_run
//! use std::time::Duration;
//! use etcd_client::{Client, Txn, TxnOp};
//! use etcd_concurrency::{Mutex, Session};
//!
//! # async fn example() -> etcd_concurrency::Result<()> {
//! let client = Client::connect(["http://127.0.0.1:2379"], None).await?;
//! // A lease kept alive in the background. If this process dies, etcd expires it after
//! // the TTL and deletes every key attached to it: its locks are released.
//! let session = Session::builder(client.clone()).ttl(Duration::from_secs(10)).build().await?;
//!
//! let mutex = Mutex::new(&session, "/locks/invoices");
//! let guard = mutex.lock().await?;
//! // Writes that must not happen without the lock are fenced by it:
//! let write = Txn::new()
//!     .when([guard.ownership_compare()])
//!     .and_then([TxnOp::put("/invoices/next", "1042", None)]);
//! if !client.clone().txn(write).await?.succeeded() {
//!     // The lock was lost (lease expired, key deleted): nothing was written.
//! }
//! guard.unlock().await?;
//! session.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Fencing: why a lock alone is not mutual exclusion
//!
//! A distributed lock is a lease: it is yours until etcd stops hearing from you for a TTL.
//! A process can be paused (a long GC, a frozen VM, SIGSTOP) or cut off from etcd for
//! longer than that. Its lease expires, another process takes the lock, and when the first
//! one resumes it still believes it holds the lock: for a while, two processes act as
//! holder, and nothing on the paused side can prevent it, because it is not running.
//!
//! The remedy is to let the *resource* reject writes from a holder that is no longer
//! current. Every [`MutexGuard`] carries a fencing token, the create revision of its key
//! in etcd, which grows with every grant of the lock:
//!
//! - for data in etcd itself, put [`MutexGuard::ownership_compare`] in the write's Txn (as
//!   above). etcd evaluates it atomically with the write: once the lease has expired or
//!   the key was deleted, the Txn does not commit, however late it arrives;
//! - for other resources, send [`MutexGuard::fencing_token`] along with each write and
//!   have the resource refuse tokens lower than the highest it has seen.
//!
//! [`MutexGuard::lost`] tells a holder that it can no longer assume it holds the lock, so
//! it can stop early; it is a courtesy, not a guarantee, for the reason above.
//!
//! # Runtime
//!
//! Everything here runs on Tokio: call it inside a Tokio runtime with its time driver
//! enabled (as `#[tokio::main]` and `#[tokio::test]` give), or it panics. A session's
//! background work (keep-alive, releases) runs as tasks on the runtime it was built on; a
//! [`ReadCache`]'s watch, on the one it was made on. So keep that runtime running for as
//! long as they are used. The same holds for etcd-client's `Client`, whose connections
//! run on the runtime it connected on: one connected on a runtime that has since shut
//! down fails every request with "Service was not ready: transport error".
//!
//! # Logging
//!
//! What goes wrong in the background (a session that lost its lease, and why; a release
//! that etcd refused; a guard dropped as its runtime shuts down, so that its key stays
//! until the lease expires; a read cache that stopped) is logged as a
//! [`tracing`](https://docs.rs/tracing) warning, as is the first failure of a background
//! release that will be retried; other retries are logged at debug level. A session closed,
//! orphaned or dropped logs nothing, unless its runtime shuts down under it. Install a
//! subscriber to see them, e.g. `tracing_subscriber::fmt::init()`.
//!
//! # Features
//!
//! - `testing`: `testing::EtcdCluster` (throwaway etcd clusters of real processes) and
//!   `testing::Proxy` (cut one client off), for testing code that uses this crate. Linux
//!   only; it runs the `etcd` binary on the `PATH`, or `$ETCD_BIN` (Debian's
//!   `etcd-server`, 3.4). Enable it for tests only:
//!
//!   ```toml
//!   [dev-dependencies]
//!   etcd-concurrency = { path = "../etcd-concurrency", features = ["testing"] }
//!   ```

#![cfg_attr(docsrs, feature(doc_cfg))]

mod acquire;
mod auth_token;
mod election;
mod error;
mod late_join;
mod mutex;
mod ownership;
mod read_cache;
mod release;
mod retry;
mod session;
mod stm;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod wait;
mod watcher;

pub use election::{Election, Leader, Leadership, Observe};
pub use error::{Error, Result};
/// etcd-client, re-exported so that the `Client` and `Compare` you build are the ones this
/// crate takes (Go's counterpart is the `clientv3` package).
pub use etcd_client;
pub use mutex::{Holder, Mutex, MutexGuard};
pub use read_cache::ReadCache;
pub use session::{
    DEFAULT_RELEASE_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, DEFAULT_TTL, Session, SessionBuilder,
};
pub use stm::{DEFAULT_MAX_ATTEMPTS, Isolation, Stm, StmTxn};

#[cfg(test)]
mod tests {
    /// The handles are shared between tasks; the guards and the observation stream move
    /// into them, and the stream needs no pinning.
    #[test]
    fn handles_are_send_and_sync_and_guards_are_send() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        fn send_unpin<T: Send + Unpin + 'static>() {}
        send_sync::<crate::Session>();
        send_sync::<crate::Mutex>();
        send_sync::<crate::Election>();
        send_sync::<crate::Stm>();
        send_sync::<crate::ReadCache>();
        send_sync::<crate::Error>();
        send::<crate::MutexGuard>();
        send::<crate::Leadership>();
        send::<crate::StmTxn>();
        send_unpin::<crate::Observe>();
    }

    /// The futures a caller holds while it waits stay small (each was 17-23 KiB before the
    /// waiting and the commit were boxed): many waiting tasks, or a caller's own future
    /// holding one, do not carry that much each.
    #[test]
    fn the_futures_of_waiting_calls_are_small() {
        fn size_of_output<A, F>(_: impl FnOnce(A) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let lock = size_of_output(|mutex: &'static crate::Mutex| mutex.lock());
        let campaign = size_of_output(|election: &'static crate::Election| election.campaign(""));
        let run = size_of_output(|stm: &'static crate::Stm| {
            stm.run(async |tx| tx.get("k").await.map(drop))
        });
        assert!(lock <= 2048, "lock(): {lock} bytes");
        assert!(campaign <= 2048, "campaign(): {campaign} bytes");
        assert!(run <= 8192, "run(): {run} bytes");
    }
}

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;
