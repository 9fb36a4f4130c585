//! Distributed coordination over etcd: sessions, locks, leader election and software
//! transactional memory, built client-side from etcd's Txn, Range, Watch and Lease
//! primitives. The Rust counterpart of etcd's Go package `client/v3/concurrency`.
//!
//! # Quick start
//!
//! ```no_run
//! use std::time::Duration;
//! use etcd_concurrency::Session;
//!
//! # async fn example() -> etcd_concurrency::Result<()> {
//! let client = etcd_client::Client::connect(["http://127.0.0.1:2379"], None).await?;
//! // A lease kept alive in the background; when this process dies, etcd expires it
//! // after the TTL and deletes every key attached to it.
//! let session = Session::builder(client).ttl(Duration::from_secs(10)).build().await?;
//! session.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! - `testing`: [`testing::EtcdCluster`] (throwaway etcd clusters of real processes) and
//!   [`testing::Proxy`] (cut one client off), for testing code that uses this crate.

mod error;
mod release;
mod retry;
mod session;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{Error, Result};
pub use etcd_client;
pub use session::{
    DEFAULT_RELEASE_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, DEFAULT_TTL, Session, SessionBuilder,
};
