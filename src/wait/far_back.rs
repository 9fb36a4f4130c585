//! Waiting far back in a long queue: follow one key ahead, not the whole queue.
//!
//! A waiter that follows the whole queue hears of every release, so a queue of `n`
//! waiters costs etcd `n` watch events per hand-off, and draining it `n²`: 1,000 waiters
//! took 2-6 ms per hand-off (etcd's CPU the limit), where Go's, each watching only its
//! predecessor, took under 1 ms. So a waiter with more than [`FOLLOWED_AHEAD`] keys ahead
//! watches only the key one place further ahead than that; once that key is gone, it
//! follows the whole queue as before (its watch reads the queue once), with no request per
//! hand-off. Each release then reaches at most [`FOLLOWED_AHEAD`] + 1 waiters.
//!
//! Moving up opens a watch on the busy queue, which etcd puts on its 100 ms unsynced path
//! when a write races its creation: the move must come well before the turn. With 32
//! places, queues of 100-200 waiters drained 2-5 times slower than with none (0.4-0.5 ms
//! per hand-off on one member in tmpfs); with 128, every size from 100 to 2,000 took
//! 0.4-2.2 ms per hand-off (Go's: 0.6-1.7 ms), 113-142 events each.
//!
//! Far back, a waiter also watches its own key (one event, its deletion), so that it
//! learns at once that the key was deleted, alone or with its lease: `lost()` tells of a
//! revoked lease only at the next keep-alive, up to a third of the TTL later.

use etcd_client::KeyValue;

use crate::error::{Error, Result};
use crate::session::Session;
use crate::watcher::until_gone;

/// How many keys ahead a waiter follows the whole queue from.
const FOLLOWED_AHEAD: usize = 128;

/// The key that a waiter with create revision `token` follows in `queue`, with its create
/// revision: the one [`FOLLOWED_AHEAD`] + 1 places ahead; `None` when it is nearer.
pub(super) fn key_to_follow(queue: &[KeyValue], token: i64) -> Option<(Vec<u8>, i64)> {
    let mut ahead: Vec<&KeyValue> = queue
        .iter()
        .filter(|kv| kv.create_revision() < token)
        .collect();
    let place = ahead.len().checked_sub(FOLLOWED_AHEAD + 1)?;
    let (_, followed, _) = ahead.select_nth_unstable_by_key(place, |kv| kv.create_revision());
    Some((followed.key().to_vec(), followed.create_revision()))
}

/// Where a waiter far back stands once [`until_moved`] resolves.
pub(super) enum Moved {
    /// The followed key is gone: the waiter is nearer now.
    Up,
    /// The waiter's own key is gone (deleted, or with its lease).
    MineGone,
}

/// Resolves once the followed key `key` no longer has create revision `token` (`Up`), or
/// the waiter's own key `mine` no longer has create revision `my_token` (`MineGone`),
/// following both from a view as of `revision`. Its own key is watched too so that a
/// waiter far back learns of its key's deletion (a revoked lease, someone's delete) at
/// once, as a waiter near the head does: the watch carries that one deletion only.
///
/// Errors: [`Error::SessionLost`] if `session` is lost first; etcd's refusal of a watch.
pub(super) async fn until_moved(
    session: &Session,
    (key, token): (&[u8], i64),
    (mine, my_token): (&[u8], i64),
    revision: i64,
) -> Result<Moved> {
    let client = session.client();
    tokio::select! {
        () = session.lost() => Err(Error::SessionLost),
        gone = until_gone(client, key, token, revision) => gone.map(|()| Moved::Up),
        gone = until_gone(client, mine, my_token, revision) => gone.map(|()| Moved::MineGone),
    }
}
