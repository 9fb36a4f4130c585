//! Throwaway etcd clusters and fault injection, for tests (feature `testing`).
//!
//! [`EtcdCluster`] starts real `etcd` processes (Debian package `etcd-server`, 3.4) on free
//! loopback ports with their data in tmpfs (on disk if it lacks room), and can kill, pause,
//! resume and restart members, and cut one off from the others.
//! [`Proxy`] sits between one client and one endpoint and can cut or stall its traffic.
//! Everything started here stops when its handle is dropped, also when a test panics (a
//! cluster then prints the end of each member's log, shown with the failure).
//! Linux only (members die with the test process through `PR_SET_PDEATHSIG`).
//!
//! ```no_run
//! use etcd_concurrency::testing::EtcdCluster;
//!
//! # async fn example() -> etcd_concurrency::Result<()> {
//! let cluster = EtcdCluster::start(3).await;
//! let mut client = cluster.client().await;
//! client.put("greeting", "hello", None).await?;
//! cluster.kill(0); // the other two keep quorum
//! # Ok(())
//! # }
//! ```

mod accept;
mod cluster;
mod peer_links;
mod proxy;

pub use cluster::EtcdCluster;
pub use proxy::Proxy;
