//! The links between a cluster's members: one proxy in front of each member's peer port,
//! which can cut a member off from the others while clients still reach it.
//!
//! etcd members talk over HTTP on their peer ports, and each raft request names the member
//! that sent it (header `X-Server-From`, its member id in hex): that is how a proxy in
//! front of member `j` tells a connection from an isolated member `i` from the others'.
//! The proxies run on a runtime of their own, on a thread that lives as long as the
//! process, so that a cluster shared between tests (each on its own runtime) keeps its
//! links when the test that started it ends.

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};

/// Which members are cut off, and the member id of each member once known.
#[derive(Debug, Default)]
struct Partition {
    isolated: BTreeSet<usize>,
    ids: Vec<Option<u64>>,
}

impl Partition {
    /// Whether a connection to member `to` from the member with id `sender` (if it named
    /// itself) must not pass.
    fn cuts(&self, sender: Option<u64>, to: usize) -> bool {
        let from = sender.and_then(|id| self.ids.iter().position(|&known| known == Some(id)));
        self.isolated.contains(&to) || from.is_some_and(|from| self.isolated.contains(&from))
    }
}

/// The proxies in front of the members' peer ports; dropping it closes them all.
#[derive(Debug)]
pub(super) struct PeerLinks {
    partition: watch::Sender<Partition>,
    accept_loops: Vec<AbortHandle>,
}

impl PeerLinks {
    /// Forwards each of `listeners` (member `i`'s advertised peer port) to port
    /// `member_ports[i]` on loopback, where member `i` listens.
    pub(super) fn start(listeners: Vec<std::net::TcpListener>, member_ports: &[u16]) -> PeerLinks {
        let partition = watch::Sender::new(Partition {
            isolated: BTreeSet::new(),
            ids: vec![None; member_ports.len()],
        });
        let accept_loops = listeners
            .into_iter()
            .zip(member_ports)
            .enumerate()
            .map(|(i, (listener, &port))| {
                let links = accept_loop(listener, i, port, partition.subscribe());
                links_runtime().spawn(links).abort_handle()
            })
            .collect();
        PeerLinks {
            partition,
            accept_loops,
        }
    }

    /// Notes that member `i` has the member id `id`.
    pub(super) fn learn_id(&self, i: usize, id: u64) {
        self.partition.send_if_modified(|partition| {
            let known = partition.ids[i] == Some(id);
            partition.ids[i] = Some(id);
            !known
        });
    }

    pub(super) fn isolate(&self, i: usize) {
        self.partition.send_modify(|partition| {
            partition.isolated.insert(i);
        });
    }

    pub(super) fn rejoin(&self, i: usize) {
        self.partition.send_modify(|partition| {
            partition.isolated.remove(&i);
        });
    }
}

impl Drop for PeerLinks {
    fn drop(&mut self) {
        self.accept_loops.iter().for_each(AbortHandle::abort);
    }
}

/// The runtime the links run on, driven by a thread that lives as long as the process.
fn links_runtime() -> &'static Handle {
    static RUNTIME: OnceLock<Handle> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build the runtime of the links between etcd members");
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("etcd-cluster-peer-links".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .expect("start the thread of the links between etcd members");
        handle
    })
}

async fn accept_loop(
    listener: std::net::TcpListener,
    to: usize,
    member_port: u16,
    partition: watch::Receiver<Partition>,
) {
    let listener = listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener));
    let Ok(listener) = listener else {
        return; // the member's peers cannot reach it: it never becomes healthy
    };
    // Dropping the set (when this task is aborted) aborts every connection task.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((peer, _)) = accepted else {
                    // Out of file descriptors, say: give the connections time to end.
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                };
                connections.spawn(forward(peer, to, member_port, partition.clone()));
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

/// How long the accept loop waits after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Forwards one connection to member `to` until both sides have closed it, or until the
/// partition cuts it: at once if it does when the request's head has arrived.
async fn forward(
    mut peer: TcpStream,
    to: usize,
    member_port: u16,
    mut partition: watch::Receiver<Partition>,
) {
    let Some((head, sender)) = read_head(&mut peer).await else {
        return;
    };
    let cut = partition.wait_for(|partition| partition.cuts(sender, to));
    tokio::select! {
        _ = cut => {}
        () = relay(peer, &head, member_port) => {}
    }
}

async fn relay(mut peer: TcpStream, head: &[u8], member_port: u16) {
    let Ok(mut member) = TcpStream::connect(("127.0.0.1", member_port)).await else {
        return;
    };
    let _ = peer.set_nodelay(true);
    let _ = member.set_nodelay(true);
    if member.write_all(head).await.is_ok() {
        let _ = tokio::io::copy_bidirectional(&mut peer, &mut member).await;
    }
}

/// The most read while looking for the end of a request's head.
const HEAD_LIMIT: usize = 16 << 10;

/// Reads a connection's first bytes up to the end of its HTTP request head (or
/// [`HEAD_LIMIT`] bytes), and the member id the request names as its sender, if any.
/// `None` if the connection ends first.
async fn read_head(peer: &mut TcpStream) -> Option<(Vec<u8>, Option<u64>)> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while head.len() < HEAD_LIMIT && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match peer.read(&mut buffer).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
    }
    let sender = String::from_utf8_lossy(&head)
        .lines()
        .take_while(|line| !line.is_empty())
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("x-server-from"))
        .and_then(|(_, id)| u64::from_str_radix(id.trim(), 16).ok());
    Some((head, sender))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_cut_if_either_end_is_isolated_and_the_sender_is_known() {
        let partition = Partition {
            isolated: BTreeSet::from([1]),
            ids: vec![Some(0xa), Some(0xb), None],
        };
        assert!(partition.cuts(Some(0xa), 1), "to an isolated member");
        assert!(
            partition.cuts(None, 1),
            "to an isolated member, sender unknown"
        );
        assert!(partition.cuts(Some(0xb), 0), "from an isolated member");
        assert!(
            !partition.cuts(Some(0xa), 2),
            "between members not isolated"
        );
        assert!(
            !partition.cuts(None, 0),
            "sender unknown, to a member not isolated"
        );
    }
}
