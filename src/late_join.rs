//! Join attempts delivered late. A join Txn that went unanswered is sent again, and one
//! whose outcome is unknown is undone by looking its key up; but the first attempt may
//! only have been held up (a stalled link that heals, a paused member that resumes) and
//! reach etcd after the key was released or looked up. Its condition then holds again
//! and it creates the key anew, for nobody: a holder or candidate that blocks everyone
//! else while the session lives. So after such a join the session watches its key for
//! as long as it lives, and deletes every incarnation that no handle of it uses.

use etcd_client::{EventType, GetOptions, KeyValue};

use crate::ownership::release_lease_key;
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
    /// late join attempt, until the session is dropped; once per key.
    pub(crate) fn watch_for_late_joins(&self, name: &[u8], owner: Owner) {
        let key = self.key_in(name);
        let watch = withdraw_late_joins(self.downgrade(), name.to_vec(), key.clone(), owner);
        self.spawn_once_for_key(key, watch);
    }
}

async fn withdraw_late_joins(session: WeakSession, name: Vec<u8>, key: Vec<u8>, owner: Owner) {
    let Some(client) = session.upgrade().map(|live| live.client().clone()) else {
        return;
    };
    let mut follower = Follower::new(client, key.clone(), false, GetOptions::new(), 0);
    loop {
        let update = match follower.next().await {
            Ok(update) => update,
            Err(error) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "watching for late join attempts failed; a late one would leave its key"
                );
                return;
            }
        };
        let Some(lease) = session
            .upgrade()
            .filter(|live| !live.has_ended() && !live.is_lost())
            .map(|live| live.lease_id())
        else {
            return;
        };
        let ours = |kv: &KeyValue| kv.lease() == lease;
        let created = match update {
            Update::Snapshot { kvs, .. } => kvs.iter().any(ours),
            Update::Events(events) => events
                .iter()
                .filter(|event| event.event_type() == EventType::Put)
                .filter_map(|event| event.kv())
                .any(|kv| ours(kv) && kv.version() == 1),
        };
        if created {
            withdraw_if_unused(&session, &name, &key, owner).await;
        }
    }
}

/// Deletes the session's `key` once no handle of the session uses it or is about to (a
/// join in flight would adopt it). Holds the session only while it looks at its slots, so
/// that dropping its last handle still revokes the lease.
async fn withdraw_if_unused(session: &WeakSession, name: &[u8], key: &[u8], owner: Owner) {
    let Some(live) = session.upgrade() else {
        return;
    };
    let held = match owner {
        Owner::Mutex => {
            // Held by a guard, a lock() or a release in progress: wait for them (the
            // incarnation may have been made just after a release's delete).
            let slot = live.queue_slot(name);
            drop(live);
            (Some(slot.lock_owned().await), None)
        }
        Owner::Election => match live.claim_unknown_key(name).await {
            Some(last) => (None, Some(last)),
            None => return, // the last campaign or leadership to go looks for it
        },
    };
    tracing::debug!("looking for a key made by a late join attempt");
    release_lease_key(session.clone(), key).await;
    drop(held);
}
