//! A loopback TCP proxy that can cut or stall one client's traffic to etcd.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Stalled,
    Cut,
}

/// A TCP proxy on a free loopback port in front of one etcd endpoint.
///
/// Point a client at [`endpoint`](Self::endpoint) instead of the member's own URL; then
/// [`cut`](Self::cut) or [`stall`](Self::stall) isolates that client while everyone else
/// keeps talking to etcd, and [`heal`](Self::heal) reconnects it. The proxy runs on the
/// Tokio runtime it was started on and stops (dropping every connection) when dropped.
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
#[derive(Debug)]
pub struct Proxy {
    address: SocketAddr,
    mode: watch::Sender<Mode>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `target` (`http://host:port` or `host:port`) on a free loopback
    /// port. Connections to the target are made lazily, one per accepted connection.
    ///
    /// # Errors
    ///
    /// If no loopback port can be bound.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future before it returns leaves no listener or task.
    pub async fn start(target: &str) -> std::io::Result<Proxy> {
        let target = target.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Open);
        let accept_loop = tokio::spawn(accept_loop(listener, target, mode.subscribe()));
        Ok(Proxy {
            address,
            mode,
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
        self.mode.send_replace(Mode::Cut);
    }

    /// Keeps connections open but forwards nothing in either direction, as with a
    /// partition that drops packets silently: requests hang instead of failing.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stalled);
    }

    /// Forwards traffic again (held bytes are delivered; cut connections stay closed,
    /// new ones are accepted).
    pub fn heal(&self) {
        self.mode.send_replace(Mode::Open);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: String, mode: watch::Receiver<Mode>) {
    // Dropping the set (when this task is aborted) aborts every connection task.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                if *mode.borrow() == Mode::Cut {
                    continue; // dropped: the client sees the connection closed at once
                }
                connections.spawn(forward(client, target.clone(), mode.clone()));
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn forward(client: TcpStream, target: String, mode: watch::Receiver<Mode>) {
    let Ok(upstream) = TcpStream::connect(&target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let mut cut = mode.clone();
    tokio::select! {
        _ = pump(client_read, upstream_write, mode.clone()) => {}
        _ = pump(upstream_read, client_write, mode) => {}
        _ = cut.wait_for(|m| *m == Mode::Cut) => {}
    }
}

/// Copies bytes one way, holding them while the proxy is stalled.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match mode.wait_for(|m| *m != Mode::Stalled).await {
            Ok(m) if *m == Mode::Open => {}
            _ => return,
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
