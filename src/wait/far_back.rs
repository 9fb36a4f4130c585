//! Waiting far back in a long queue: follow one key ahead, not the whole queue.
//!
//! A waiter that follows the whole queue hears of every release, so a queue of `n`
//! waiters costs etcd `n` watch events per hand-off, and draining it `n²`: 1,000 waiters
//! took 2-6 ms per hand-off (etcd's CPU the limit), where Go's, each watching only its
//! predecessor, took under 1 ms. So a waiter with more than [`FOLLOWED_AHEAD`] keys ahead
//! watches only the key that many places ahead of it; once that key is gone, it reads the
//! keys still ahead (one Range) and, near enough, follows the whole queue as before, with
//! no request per hand-off. Each release then reaches at most [`FOLLOWED_AHEAD`] + 1
//! waiters, and the move up happens that many hand-offs before the turn comes.
//!
//! Far back, a waiter learns that its own key was deleted (not with its lease, which
//! `lost()` tells) only when it moves up; it never takes a turn for a key that is gone.

use std::collections::HashSet;

use etcd_client::{GetOptions, KeyValue};

use super::NotMyTurn::{self, Failed, Gone};
use crate::error::Error;
use crate::retry::retry;
use crate::session::{Session, prefix_of};
use crate::watcher::{Follower, Update};

/// How many keys ahead a waiter follows the whole queue from.
pub(super) const FOLLOWED_AHEAD: usize = 32;

/// Where a waiter stands once near enough.
pub(super) enum Near {
    /// The keys ahead of it, as of a revision.
    Ahead(HashSet<Vec<u8>>, i64),
    /// Not known (the read failed, or its answer was too large): the follower reads it.
    Unknown,
}

/// Waits until at most [`FOLLOWED_AHEAD`] keys under `name/` are ahead of `key` (create
/// revision `token`), given the `queue` as read at `revision`.
///
/// Errors: `Gone` if the key was found deleted; `Failed` if the session is lost, or etcd
/// refused the watch.
pub(super) async fn wait_until_near(
    session: &Session,
    name: &[u8],
    key: &[u8],
    token: i64,
    queue: &[KeyValue],
    revision: i64,
) -> Result<Near, NotMyTurn> {
    let (mut ahead, mut revision) = (in_order_before(queue, token), revision);
    while ahead.len() > FOLLOWED_AHEAD {
        let (target, target_token) = &ahead[ahead.len() - FOLLOWED_AHEAD - 1];
        tokio::select! {
            () = session.lost() => return Err(Failed(Error::SessionLost)),
            gone = until_gone(session, target, *target_token, revision) => gone?,
        }
        let read = tokio::select! {
            () = session.lost() => return Err(Failed(Error::SessionLost)),
            read = read_up_to(session, name, token) => read,
        };
        let Some((queue, read_at)) = read else {
            return Ok(Near::Unknown);
        };
        if !queue
            .iter()
            .any(|kv| kv.key() == key && kv.create_revision() == token)
        {
            return Err(Gone);
        }
        (ahead, revision) = (in_order_before(&queue, token), read_at);
    }
    let ahead = ahead.into_iter().map(|(key, _)| key).collect();
    Ok(Near::Ahead(ahead, revision))
}

/// The keys in `queue` created before `token`, with their create revisions, oldest first.
fn in_order_before(queue: &[KeyValue], token: i64) -> Vec<(Vec<u8>, i64)> {
    let mut ahead: Vec<_> = queue
        .iter()
        .filter(|kv| kv.create_revision() < token)
        .map(|kv| (kv.key().to_vec(), kv.create_revision()))
        .collect();
    ahead.sort_unstable_by_key(|(_, created)| *created);
    ahead
}

/// Resolves once `key` no longer has create revision `token`, following it from a view
/// as of `revision`.
async fn until_gone(
    session: &Session,
    key: &[u8],
    token: i64,
    revision: i64,
) -> Result<(), NotMyTurn> {
    let read = GetOptions::new().with_keys_only();
    let client = session.client().clone();
    let mut follower = Follower::new(client, key.to_vec(), false, read, revision).deletes_only();
    loop {
        match follower.next().await.map_err(Failed)? {
            Update::Snapshot { kvs, .. } if kvs.iter().any(|kv| kv.create_revision() == token) => {}
            // Gone from a fresh read, or deleted: only deletions come as events.
            _ => return Ok(()),
        }
    }
}

/// The keys under `name/` created up to `token`, and the revision they were read at; `None`
/// if the read failed.
async fn read_up_to(session: &Session, name: &[u8], token: i64) -> Option<(Vec<KeyValue>, i64)> {
    let read = GetOptions::new()
        .with_prefix()
        .with_keys_only()
        .with_max_create_revision(token);
    let prefix = prefix_of(name);
    let answer = retry(session.client(), session.request_timeout(), |mut c| {
        let (prefix, read) = (prefix.clone(), read.clone());
        async move { c.get(prefix, Some(read)).await }
    })
    .await;
    match answer {
        Ok(mut answer) => {
            let read_at = answer.header().map_or(0, |h| h.revision());
            Some((answer.take_kvs(), read_at))
        }
        Err(error) => {
            tracing::debug!(%error, "cannot read the queue ahead; following all of it");
            None
        }
    }
}
