//! Join attempts delivered late. A join Txn that went unanswered is sent again, and one
//! whose outcome is unknown is undone by looking its key up (a lock's is left to the watch
//! below, which deletes it unless a later call takes it up); but the first attempt may only
//! have been held up (a stalled link that heals, a paused member that resumes) and reach
//! etcd after the key was released or looked up. Its condition then holds again and it
//! creates the key anew, for nobody: a holder or candidate that blocks everyone else while
//! the session lives. So after such a join the session watches its key for as long as it
//! lives, and deletes every incarnation that no handle of it uses.

use std::time::Duration;

use etcd_client::{EventType, GetOptions, KeyValue};
use tokio::time::Instant;

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

/// An incarnation of the watched key that no join of the session noted (yet).
struct Suspect {
    revision: i64,
    /// Election only: the campaigns and leaderships holding the claim were told of it.
    told: bool,
}

async fn withdraw_late_joins(session: WeakSession, name: Vec<u8>, key: Vec<u8>, owner: Owner) {
    let Some((client, mut ended)) = session
        .upgrade()
        .map(|live| (live.client().clone(), live.ended_signal()))
    else {
        return;
    };
    let mut follower = Follower::new(client, key.clone(), false, GetOptions::new(), 0);
    // The key has one incarnation at a time: the newest one seen, until it is deleted.
    let mut suspect: Option<Suspect> = None;
    let mut backoff = Backoff::new();
    let tick = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(tick);
    loop {
        // Events are read all along, also while a suspect waits (unread, they would hold
        // up the whole connection), and a read in progress (perhaps re-opening the watch)
        // is never cut short by a tick.
        let next = follower.next();
        tokio::pin!(next);
        let update = loop {
            tokio::select! {
                update = &mut next => break update,
                _ = ended.wait_for(|ended| *ended) => return,
                () = &mut tick, if suspect.is_some() => {}
            }
            if let Some(waiting) = suspect.take() {
                suspect = settle(&session, &name, &key, owner, waiting).await;
            }
            tick.as_mut().reset(Instant::now() + backoff.next_delay());
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
        match update {
            Update::Snapshot { kvs, .. } => {
                suspect = kvs.iter().find(|kv| ours(kv)).map(|kv| Suspect {
                    revision: kv.create_revision(),
                    told: false,
                });
            }
            Update::Events(events) => {
                for event in &events {
                    let Some(kv) = event.kv() else { continue };
                    match event.event_type() {
                        EventType::Delete => suspect = None,
                        EventType::Put if ours(kv) && kv.version() == 1 => {
                            suspect = Some(Suspect {
                                revision: kv.create_revision(),
                                told: false,
                            });
                        }
                        EventType::Put => {}
                    }
                }
            }
        }
        if let Some(waiting) = suspect.take() {
            suspect = settle(&session, &name, &key, owner, waiting).await;
            backoff = Backoff::new();
            tick.as_mut().reset(Instant::now() + backoff.next_delay());
        }
    }
}

/// Deals with `suspect` as far as it can without waiting: returns it if it must wait
/// (a handle of the session holds the key's slot or claim).
async fn settle(
    session: &WeakSession,
    name: &[u8],
    key: &[u8],
    owner: Owner,
    suspect: Suspect,
) -> Option<Suspect> {
    let live = session.upgrade()?;
    if live.was_joined(key, suspect.revision) {
        return None;
    }
    match owner {
        Owner::Mutex => {
            // A join holds the slot from before its Txn until its key is gone, and notes
            // what it takes up while it holds it: unnoted once the slot is free, the
            // incarnation is a late one. The slot is only tried, never queued for, so
            // that a `try_lock` of the session finds it taken only while a late key is
            // being deleted.
            let Ok(held) = live.queue_slot(name).try_lock_owned() else {
                return Some(suspect);
            };
            if live.was_joined(key, suspect.revision) {
                return None;
            }
            drop(live);
            tracing::debug!(
                suspect.revision,
                "withdrawing a lock key made by a late join"
            );
            release_while_session_lives(session.clone(), key, suspect.revision).await;
            drop(held);
            None
        }
        Owner::Election => {
            // Tell the campaigns and leaderships holding the claim, so that the last of
            // them to go looks for the key; with none left, delete it under the claim.
            let unknown = live.unknown_election_key(name);
            drop(live);
            let last = match suspect.told {
                false => unknown.note(),
                true => unknown.settle(),
            };
            match last {
                Some(Some(last)) => {
                    tracing::debug!(suspect.revision, "withdrawing an election key made late");
                    release_lease_key(session.clone(), key).await;
                    drop(last);
                    None
                }
                Some(None) if suspect.told => None, // one of them took the note
                Some(None) => Some(Suspect {
                    told: true,
                    ..suspect
                }),
                None => Some(suspect),
            }
        }
    }
}
