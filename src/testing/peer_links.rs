//! The links between a cluster's members: one proxy in front of each member's peer port,
//! which can cut a member off from the others while clients still reach it.
//!
//! etcd members talk over HTTP on their peer ports, and each raft request names the member
//! that sent it (header `X-Server-From`, its member id in hex): that is how a proxy in
//! front of member `j` tells a connection from an isolated member `i` from the others'
//! (by the first request on it that names a sender: a connection opened for a request
//! that names none, such as a probe, may carry raft's requests later).
//! The proxies run on a runtime of their own, on a thread that lives as long as the
//! process, so that a cluster shared between tests (each on its own runtime) keeps its
//! links when the test that started it ends.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::accept::accept_each;

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
    accept_each(listener, |peer| {
        Some(forward(peer, to, member_port, partition.clone()))
    })
    .await;
}

/// Forwards one connection to member `to` until both sides have closed it, or until the
/// partition cuts it. Its sender is the member that the first of its requests to name one
/// names (a connection opened for a request that does not, a probe of etcd's, may carry
/// raft's requests later), and bytes that name a sender cut off are not passed on.
async fn forward(
    peer: TcpStream,
    to: usize,
    member_port: u16,
    mut partition: watch::Receiver<Partition>,
) {
    if partition.borrow_and_update().cuts(None, to) {
        return;
    }
    let Ok(member) = TcpStream::connect(("127.0.0.1", member_port)).await else {
        return;
    };
    let _ = peer.set_nodelay(true);
    let _ = member.set_nodelay(true);
    let (mut requests, mut peer_write) = peer.into_split();
    let (mut answers, mut member_write) = member.into_split();
    let answered = tokio::io::copy(&mut answers, &mut peer_write);
    tokio::pin!(answered);
    let mut sender = SenderScan::default();
    let mut buffer = vec![0u8; 64 << 10];
    let mut requests_open = true;
    loop {
        tokio::select! {
            changed = partition.changed() => {
                if changed.is_err() || partition.borrow_and_update().cuts(sender.id, to) {
                    return;
                }
            }
            // The member closed the connection, and all it sent is delivered.
            _ = &mut answered => return,
            read = requests.read(&mut buffer), if requests_open => match read {
                Ok(0) | Err(_) => {
                    requests_open = false;
                    let _ = member_write.shutdown().await;
                }
                Ok(n) => {
                    sender.scan(&buffer[..n]);
                    if partition.borrow_and_update().cuts(sender.id, to)
                        || member_write.write_all(&buffer[..n]).await.is_err()
                    {
                        return;
                    }
                }
            },
        }
    }
}

/// Finds the member id in the first `X-Server-From` header of requests read in pieces.
#[derive(Debug, Default)]
struct SenderScan {
    id: Option<u64>,
    /// The end of what was read, where the header may have begun.
    unread: Vec<u8>,
}

/// The header as Go's `net/http` writes it, after the line before it.
const SENDER_HEADER: &[u8] = b"\r\nX-Server-From:";

impl SenderScan {
    fn scan(&mut self, bytes: &[u8]) {
        if self.id.is_some() {
            return;
        }
        self.unread.extend_from_slice(bytes);
        let Some(at) = find(&self.unread, SENDER_HEADER) else {
            // Keep only what may be the start of the header.
            let keep_from = self.unread.len().saturating_sub(SENDER_HEADER.len() - 1);
            self.unread.drain(..keep_from);
            return;
        };
        let value = &self.unread[at + SENDER_HEADER.len()..];
        match find(value, b"\r\n") {
            Some(end) => {
                let id = std::str::from_utf8(&value[..end]).ok();
                self.id = id.and_then(|id| u64::from_str_radix(id.trim(), 16).ok());
                self.unread.clear();
            }
            // The value has not all arrived: keep it, unless no header is this long.
            None if value.len() > 64 => self.unread.clear(),
            None => drop(self.unread.drain(..at)),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
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

    #[test]
    fn the_sender_is_the_first_one_named_on_the_connection_even_split_across_reads() {
        let requests: &[u8] = b"GET /raft/probing HTTP/1.1\r\nHost: m\r\n\r\n\
            POST /raft HTTP/1.1\r\nHost: m\r\nX-Server-From: 8e9e05c52164694d\r\n\r\nbody\
            POST /raft HTTP/1.1\r\nX-Server-From: 1\r\n\r\n";
        for piece in [1, 3, 7, 16, requests.len()] {
            let mut scan = SenderScan::default();
            for bytes in requests.chunks(piece) {
                scan.scan(bytes);
            }
            assert_eq!(
                scan.id,
                Some(0x8e9e05c52164694d),
                "read {piece} bytes at a time"
            );
        }
        let mut unnamed = SenderScan::default();
        unnamed.scan(b"GET /version HTTP/1.1\r\nHost: m\r\n\r\n");
        assert_eq!(unnamed.id, None);
    }
}
