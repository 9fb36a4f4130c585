//! Claims on a session's key in an election, shared by the session's campaigns and
//! leaderships there.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard};

use super::{Session, shared_slot};

/// A campaign's (or the leadership it becomes) claim on this session's key in an
/// election. The session's campaigns and leaderships there share that key in etcd, so each
/// holds the claim shared; the last one to go takes it exclusive while it deletes the key,
/// and a campaign starting meanwhile waits for the delete instead of joining a key that is
/// about to vanish.
pub(crate) struct ElectionClaim {
    slot: Arc<tokio::sync::RwLock<Leftover>>,
    shared: OwnedRwLockReadGuard<Leftover>,
}

/// Set by a handle that, as it leaves, may leave behind an incarnation of the key that
/// nobody uses (a campaign whose join created it after a resign had deleted the old one):
/// the last claim to go looks for it.
#[derive(Default)]
pub(crate) struct Leftover(AtomicBool);

/// The last claim on an election's key, held exclusive until the key is deleted.
pub(crate) struct LastClaim {
    _exclusive: OwnedRwLockWriteGuard<Leftover>,
    leftover: bool,
}

impl Session {
    /// Claims this session's key in election `name` for a campaign, once no delete of that
    /// key is in flight.
    pub(crate) async fn claim_election(&self, name: &[u8]) -> ElectionClaim {
        let slot = shared_slot(&self.shared.elections, name);
        let shared = slot.clone().read_owned().await;
        ElectionClaim { slot, shared }
    }

    /// This session's key in election `name`, as an incarnation that no campaign may know
    /// of (made by a join attempt delivered late).
    pub(crate) fn unknown_election_key(&self, name: &[u8]) -> UnknownKey {
        UnknownKey(shared_slot(&self.shared.elections, name))
    }
}

/// An incarnation of a session's key in an election that no campaign may know of.
pub(crate) struct UnknownKey(Arc<tokio::sync::RwLock<Leftover>>);

impl UnknownKey {
    /// Tells the session's campaigns and leaderships of the key, as a handle leaving it
    /// behind would (see [`ElectionClaim::leave`]): `Some` with the claim made exclusive if
    /// none of them holds it, to delete the key under; `Some(None)` if some do (the last
    /// of them to go looks for it); `None` if a last claim is deleting the key now (it may
    /// have looked before this incarnation was made): try again after it.
    pub(crate) fn note(&self) -> Option<Option<LastClaim>> {
        let shared = self.0.clone().try_read_owned().ok()?;
        let slot = self.0.clone();
        Some(ElectionClaim { slot, shared }.leave(true))
    }

    /// After a [`note`](Self::note) that left the key to others: `Some` with the claim
    /// made exclusive if they are all gone and none of them took the note (a campaign
    /// handed the claim but dropped before it ran never does), or the last went while this
    /// looked, to delete the key under; `Some(None)` once one took it; `None` while they
    /// hold the claim.
    pub(crate) fn settle(&self) -> Option<Option<LastClaim>> {
        if let Ok(exclusive) = self.0.clone().try_write_owned() {
            let last = LastClaim::taking_note(exclusive);
            return Some(last.leftover.then_some(last));
        }
        let taken = (self.0.try_read()).map(|shared| !shared.0.load(Ordering::Acquire));
        // The last of them to go while this looked found the claim held, and left its key
        // (to this look, unknowingly): if they are all gone now, the key is nobody's.
        if let Ok(exclusive) = self.0.clone().try_write_owned() {
            return Some(Some(LastClaim::taking_note(exclusive)));
        }
        match taken {
            Ok(true) => Some(None),
            _ => None,
        }
    }
}

impl ElectionClaim {
    /// Gives the claim up. Returns it made exclusive if it was the last one, to hold until
    /// the key is deleted; `None` if another campaign or leadership of this session still
    /// uses the key: it is theirs, and stays. `may_have_left_key`: this handle may have
    /// made an incarnation of the key that nobody uses; if others still hold the claim,
    /// the last of them to go is told to look for it.
    pub(crate) fn leave(self, may_have_left_key: bool) -> Option<LastClaim> {
        if may_have_left_key {
            self.shared.0.store(true, Ordering::Release);
        }
        drop(self.shared);
        self.slot.try_write_owned().ok().map(LastClaim::taking_note)
    }
}

impl LastClaim {
    /// The claim made exclusive, which answers for any key left behind: it takes the note
    /// of one, so that the next claims start afresh.
    fn taking_note(exclusive: OwnedRwLockWriteGuard<Leftover>) -> LastClaim {
        let leftover = exclusive.0.swap(false, Ordering::Acquire);
        LastClaim {
            _exclusive: exclusive,
            leftover,
        }
    }

    /// Whether a handle that left before this one may have left a key behind.
    pub(crate) fn leftover(&self) -> bool {
        self.leftover
    }
}
