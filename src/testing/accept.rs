//! The accept loop of the kit's proxies.

use std::future::Future;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// How long the loop waits after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Accepts connections on `listener` until the task running it is aborted, handing each to
/// `serve`, whose future runs in a task of its own (aborted with the loop's), or which
/// returns `None` to have the connection closed at once.
pub(super) async fn accept_each<F, Fut>(listener: TcpListener, mut serve: F)
where
    F: FnMut(TcpStream) -> Option<Fut>,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Dropping the set (when this task is aborted) aborts every connection task.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors, say: give the connections time to end.
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                };
                if let Some(connection) = serve(stream) {
                    connections.spawn(connection);
                }
            }
            Some(_) = connections.join_next() => {}
        }
    }
}
