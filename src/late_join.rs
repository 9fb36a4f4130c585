//! Join attempts delivered late. A join Txn that went unanswered is sent again, and one
//! whose outcome is unknown is undone by looking its key up; but the first attempt may
//! only have been held up (a stalled link that heals, a paused member that resumes) and
//! reach etcd after the key was released or looked up. Its condition then holds again
//! and it creates the key anew, for nobody: a holder or candidate that blocks everyone
//! else while the session lives. So after such a join the session watches its key for
//! as long as it lives, and deletes every incarnation that no handle of it uses.

use etcd_client::{EventType, GetOptions, KeyValue};

use crate::ownership::{release_lease_key, release_while_session_lives};
use crate::retry::Backoff;
use crate::session::{Session, WeakSession};
use crate::watcher::{Follower, Update};

/// What the watched key belongs to: the in-process slot that says whether a handle of
/// the session uses it.
#[derive(Clone, Copy)]
pub(crate) enum Owner {
    Mutex,
    Election,
}

impl Session {
    /// Watches this session's key in lock or election `name` for incarnations made by a
    /// late join attempt, until the session is lost, closed, orphaned or dropped (or etcd
    /// refuses the watch: a later such join starts it again); once per key.
    pub(crate) fn watch_for_late_joins(&self, name: &[u8], owner: Owner) {
        let key = self.key_in(name);
        let watch = withdraw_late_joins(self.downgrade(), name.to_vec(), key.clone(), owner);
        self.spawn_late_join_watch(key, watch);
    }
}

async fn withdraw_late_joins(session: WeakSession, name: Vec<u8>, key: Vec<u8>, owner: Owner) {
    let Some((client, mut ended)) = session
        .upgrade()
        .map(|live| (live.client().clone(), live.ended_signal()))
    else {
        return;
    };
    let mut follower = Follower::new(client, key.clone(), false, GetOptions::new(), 0);
    loop {
        let update = tokio::select! {
            update = follower.next() => update,
            _ = ended.wait_for(|ended| *ended) => return,
        };
        let update = match update {
            Ok(update) => update,
            Err(error) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "watching for late join attempts failed; a late one would leave its key"
                );
                return;
            }
        };
        let Some(lease) = session.upgrade().map(|live| live.lease_id()) else {
            return;
        };
        let ours = |kv: &KeyValue| kv.lease() == lease;
        let created: Vec<i64> = match update {
            Update::Snapshot { kvs, .. } => kvs
                .iter()
                .filter(|kv| ours(kv))
                .map(KeyValue::create_revision)
                .collect(),
            Update::Events(events) => events
                .iter()
                .filter(|event| event.event_type() == EventType::Put)
                .filter_map(|event| event.kv())
                .filter(|kv| ours(kv) && kv.version() == 1)
                .map(KeyValue::create_revision)
                .collect(),
        };
        for revision in created {
            let withdrawn = async {
                match owner {
                    Owner::Mutex => withdraw_from_mutex(&session, &name, &key, revision).await,
                    Owner::Election => {
                        withdraw_from_election(&session, &name, &key, revision).await
                    }
                }
            };
            tokio::select! {
                () = withdrawn => {}
                _ = ended.wait_for(|ended| *ended) => return,
            }
        }
    }
}

/// Deletes incarnation `revision` of the session's `key` in mutex `name` unless a join of
/// the session took it up. Such a join holds the mutex's in-process slot from before its
/// Txn until the key is deleted, and notes the incarnation while it holds it; so an
/// incarnation not noted once the slot is free is a late one. The slot is only tried,
/// never queued for, so that a `try_lock` of the session does not find it taken by this
/// watch unless a late key is there.
async fn withdraw_from_mutex(session: &WeakSession, name: &[u8], key: &[u8], revision: i64) {
    let mut backoff = Backoff::new();
    loop {
        let Some(live) = session.upgrade() else {
            return;
        };
        if live.was_joined(key, revision) {
            return;
        }
        if let Ok(held) = live.queue_slot(name).try_lock_owned() {
            if live.was_joined(key, revision) {
                return;
            }
            drop(live);
            tracing::debug!(
                revision,
                "withdrawing a lock key made by a late join attempt"
            );
            release_while_session_lives(session.clone(), key, revision).await;
            drop(held);
            return;
        }
        drop(live);
        backoff.wait().await;
    }
}

/// Deletes incarnation `revision` of the session's `key` in election `name` unless a
/// campaign of the session took it up (noted while it holds its claim). Otherwise tells
/// the campaigns and leaderships holding the claim, so that the last of them to go looks
/// for it, or, with none left, deletes it under the claim made exclusive.
async fn withdraw_from_election(session: &WeakSession, name: &[u8], key: &[u8], revision: i64) {
    let mut backoff = Backoff::new();
    let mut noted = false;
    loop {
        let Some(live) = session.upgrade() else {
            return;
        };
        if live.was_joined(key, revision) {
            return;
        }
        let unknown = live.unknown_election_key(name);
        drop(live);
        match if noted {
            unknown.settle()
        } else {
            unknown.note()
        } {
            Some(Some(last)) => {
                tracing::debug!(revision, "withdrawing an election key made by a late join");
                release_lease_key(session.clone(), key).await;
                drop(last);
                return;
            }
            Some(None) if noted => return, // one of them took the note
            Some(None) => noted = true,
            None => {}
        }
        backoff.wait().await;
    }
}
