//! A loopback TCP proxy that can cut, stall or slow down one client's traffic to etcd.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;

use super::accept::accept_each;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Stalled,
    Cut,
}

/// The mode, how many times the proxy was cut (a connection accepted before a cut is
/// dropped even if the proxy was healed before its task saw the cut), and the delay added
/// to each byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    mode: Mode,
    cuts: u64,
    delay: Duration,
}

/// A TCP proxy on a free loopback port in front of one etcd endpoint. To cut a client off
/// from a cluster of three, give it three proxies, one per member.
///
/// Point a client at [`endpoint`](Self::endpoint) instead of the member's own URL; then
/// [`cut`](Self::cut) or [`stall`](Self::stall) isolates that client while everyone else
/// keeps talking to etcd, and [`heal`](Self::heal) reconnects it; [`delay`](Self::delay)
/// makes its link slow. Each direction of a connection is forwarded until its sender
/// closes it, so a client's half-close still gets the answer. The proxy runs on the Tokio
/// runtime it was started on; once dropped, it stops (closing its port and every
/// connection) as soon as that runtime next runs its task. No counterpart in Go's
/// `concurrency` package; etcd's Go integration tests put a `bridge` (`Blackhole`,
/// `Pause`) between client and member for the same purpose.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use etcd_concurrency::testing::{EtcdCluster, Proxy};
///
/// let cluster = EtcdCluster::start(1).await;
/// let proxy = Proxy::start(&cluster.endpoint(0)).await?;
/// let mut client = etcd_client::Client::connect([proxy.endpoint()], None).await?;
/// proxy.cut(); // requests through `client` now fail
/// proxy.heal(); // and work again
/// # Ok(())
/// # }
/// ```
pub struct Proxy {
    address: SocketAddr,
    mode: watch::Sender<State>,
    held: Held,
    accept_loop: tokio::task::JoinHandle<()>,
}

/// The bytes read from clients while the proxy is stalled, since it was (not yet delivered).
type Held = Arc<watch::Sender<Vec<u8>>>;

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("address", &self.address)
            .field("state", &*self.mode.borrow())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Starts a proxy to `target` (`http://host:port` or `host:port`) on a free loopback
    /// port. Connections to the target are made lazily, one per accepted connection.
    ///
    /// # Errors
    ///
    /// If no loopback port can be bound.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime with its I/O and time drivers.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future before it returns leaves no listener or task.
    pub async fn start(target: &str) -> std::io::Result<Proxy> {
        let target = target.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (mode, _) = watch::channel(State {
            mode: Mode::Open,
            cuts: 0,
            delay: Duration::ZERO,
        });
        let held = Arc::new(watch::Sender::new(Vec::new()));
        let accept_loop = tokio::spawn(accept_loop(
            listener,
            target,
            mode.subscribe(),
            held.clone(),
        ));
        Ok(Proxy {
            address,
            mode,
            held,
            accept_loop,
        })
    }

    /// The URL to give a client instead of the target's (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Drops every open connection and refuses new ones (each is closed as soon as it is
    /// accepted), as when a network link goes down.
    pub fn cut(&self) {
        self.mode.send_modify(|state| {
            state.mode = Mode::Cut;
            state.cuts += 1;
        });
    }

    /// Keeps connections open but forwards nothing in either direction, as with a
    /// partition that drops packets silently: requests hang instead of failing. New
    /// connections are accepted (the client's TCP connect succeeds, unlike across a real
    /// partition) and connected to the target only once healed.
    pub fn stall(&self) {
        self.held.send_modify(Vec::clear);
        self.mode.send_modify(|state| state.mode = Mode::Stalled);
    }

    /// Resolves once the bytes that clients sent while the proxy is stalled, which it holds
    /// until [`heal`](Self::heal), contain `pattern` (at once for an empty one): for a test
    /// that must know a request has left the client (gRPC sends keys and values as they
    /// are, so a distinctive value or key name will do). Only connections open before the
    /// stall are read while it lasts: requests on a connection opened during it are never
    /// held here. Wrap it in [`tokio::time::timeout`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only watches.
    pub async fn until_holding(&self, pattern: &[u8]) {
        let mut held = self.held.subscribe();
        let found = held.wait_for(|bytes| {
            pattern.is_empty() || bytes.windows(pattern.len()).any(|w| w == pattern)
        });
        // The sender lives as long as `self`.
        let _ = found.await;
    }

    /// Forwards traffic again (held bytes are delivered; cut connections stay closed,
    /// new ones are accepted).
    pub fn heal(&self) {
        self.mode.send_modify(|state| state.mode = Mode::Open);
        self.held.send_modify(Vec::clear);
    }

    /// Delivers each byte that arrives from now on `delay` after it arrived, in either
    /// direction, as over a slow link: a request's round trip takes at least twice
    /// `delay`. Up to 4 MiB per direction of a connection may be on its way; beyond
    /// that the proxy reads no more until some is delivered. [`Duration::ZERO`] (the
    /// default) forwards what arrives from then on at once again; bytes already on their
    /// way keep their delay, and later bytes of the same connection wait behind them.
    pub fn delay(&self, delay: Duration) {
        self.mode.send_modify(|state| state.delay = delay);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: String,
    mode: watch::Receiver<State>,
    held: Held,
) {
    accept_each(listener, |client| {
        let state = *mode.borrow();
        // Dropped when cut: the client sees the connection closed at once.
        (state.mode != Mode::Cut).then(|| {
            forward(
                client,
                target.clone(),
                mode.clone(),
                held.clone(),
                state.cuts,
            )
        })
    })
    .await;
}

/// Forwards one connection until both sides have closed it or the proxy is cut again (its
/// cut count moves past `cuts`, the count when the connection was accepted). One side's
/// close (its FIN) is passed on to the other once what it sent is delivered.
async fn forward(
    client: TcpStream,
    target: String,
    mode: watch::Receiver<State>,
    held: Held,
    cuts: u64,
) {
    let mut cut = mode.clone();
    tokio::select! {
        // The cut first: nothing is forwarded on a connection that was cut.
        biased;
        _ = cut.wait_for(|state| state.cuts != cuts) => {}
        () = relay(client, &target, mode, held) => {}
    }
}

/// Connects `client` to `target` once the proxy is not stalled (as across a partition,
/// not even that happens while it is), then pumps both directions until both have ended.
async fn relay(client: TcpStream, target: &str, mode: watch::Receiver<State>, held: Held) {
    let _ = mode
        .clone()
        .wait_for(|state| state.mode != Mode::Stalled)
        .await;
    let Ok(upstream) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    tokio::join!(
        pump(client_read, upstream_write, mode.clone(), Some(held)),
        pump(upstream_read, client_write, mode, None),
    );
}

/// How many bytes read may wait to be written: beyond that, reading waits, and the sender
/// feels TCP's back-pressure (as behind a stalled link).
const QUEUED_BYTES: usize = 4 << 20;
/// The most read at once, at most [`QUEUED_BYTES`].
const CHUNK_BYTES: usize = 64 << 10;

/// Copies bytes one way, each chunk once its delay has passed, holding them while the
/// proxy is stalled (and noting them in `held`, if given). Ends once all that was read is
/// written, or a write fails; dropping `to` then closes that direction.
async fn pump(
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
    mode: watch::Receiver<State>,
    held: Option<Held>,
) {
    // Each queued chunk holds a permit per byte (the bound), and its time.
    let (queue, queued) = mpsc::unbounded_channel();
    let deliver = deliver(queued, to, mode.clone());
    tokio::pin!(deliver);
    tokio::select! {
        () = &mut deliver => {}
        // The reader's end drops the queue's sender: what is left is delivered, then
        // `deliver` ends.
        () = receive(from, queue, mode, held) => deliver.await,
    }
}

/// A chunk read, the time it is due, and its share of the queue's bound.
type Queued = (Instant, Vec<u8>, OwnedSemaphorePermit);

/// Reads chunks into `queue`, each with the time it is due, until the connection ends;
/// notes in `held`, if given, those read while the proxy is stalled.
async fn receive(
    mut from: OwnedReadHalf,
    queue: mpsc::UnboundedSender<Queued>,
    mode: watch::Receiver<State>,
    held: Option<Held>,
) {
    let room = Arc::new(Semaphore::new(QUEUED_BYTES));
    let mut buffer = vec![0u8; CHUNK_BYTES];
    loop {
        // Room for a whole chunk first, so that a byte read is never held back.
        let room_for_a_chunk = room.clone().acquire_many_owned(CHUNK_BYTES as u32);
        let Ok(mut permit) = room_for_a_chunk.await else {
            return;
        };
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let state = *mode.borrow();
        if let Some(held) = held.as_ref().filter(|_| state.mode == Mode::Stalled) {
            held.send_modify(|bytes| bytes.extend_from_slice(&buffer[..n]));
        }
        let due = Instant::now() + state.delay;
        drop(permit.split(CHUNK_BYTES - n));
        if queue.send((due, buffer[..n].to_vec(), permit)).is_err() {
            return;
        }
    }
}

/// Writes the queued chunks, each when it is due and the proxy is not stalled.
async fn deliver(
    mut queued: mpsc::UnboundedReceiver<Queued>,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<State>,
) {
    while let Some((due, chunk, _room)) = queued.recv().await {
        tokio::time::sleep_until(due).await;
        match mode.wait_for(|state| state.mode != Mode::Stalled).await {
            Ok(state) if state.mode == Mode::Open => {}
            _ => return,
        }
        if to.write_all(&chunk).await.is_err() {
            return;
        }
    }
}
