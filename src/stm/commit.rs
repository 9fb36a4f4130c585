//! The end of an STM attempt: committing its writes if its reads are still valid, or
//! checking a read-only attempt's reads, and what a failure tells the next attempt.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::requests::{commit_once, gets, mod_revisions_at, read_set, unless_values_too_large};
use super::{Fresh, Isolation, Read, StmTxn, Write, empty_key};
use crate::error::{ETCD_MAX_TXN_OPS, Error, Result, is_compacted};
use crate::read_cache::ReadCache;
use crate::retry::retry_read_txn;

/// How a commit ended.
pub(super) enum Outcome {
    /// Committed at `revision` (0 if there was nothing to commit).
    Committed { revision: i64 },
    /// The reads were no longer valid: the fresh values of the read set (and of the
    /// prefetch keys), read by the failed Txn.
    Conflict(Fresh),
    /// The reads were no longer valid, and no values came back: a read-only check found a
    /// change among more keys than one Txn compares, or a failed Txn's values were too
    /// large to read back. `needs`: where the copy of the `ReadCache` must be to show the
    /// changes; `checked_at`: the revision the keys were checked at.
    Changed { needs: CopyNeeds, checked_at: i64 },
    /// A read-only check's follow-up reads found its revision compacted (etcd's answer):
    /// the attempt runs again, as after a compacted snapshot.
    Compacted(etcd_client::Error),
}

/// Where the copy of a `ReadCache` must be before an attempt reads it, after a check found
/// changes without their values (0: anywhere).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct CopyNeeds {
    /// The newest change to a key under the prefix: its event brings the copy there, so an
    /// attempt waits for it, up to the catch-up limit (100 ms).
    pub(super) shown: i64,
    /// At the snapshot levels, the newest change to a key outside the prefix, which an
    /// attempt pinned to the copy's revision would read stale. The copy passes it only
    /// when something under the prefix changes later, so an attempt does not wait for it:
    /// it reads from etcd unless the copy is past it already.
    pub(super) passed: i64,
}

impl CopyNeeds {
    pub(super) fn max(self, other: CopyNeeds) -> CopyNeeds {
        CopyNeeds {
            shown: self.shown.max(other.shown),
            passed: self.passed.max(other.passed),
        }
    }
}

impl StmTxn {
    /// Commits the writes if the reads are still valid; see [`Outcome`].
    pub(super) async fn commit(self, prefetch: &[Vec<u8>]) -> Result<Outcome> {
        if self.writes.contains_key(&[][..]) {
            return Err(empty_key());
        }
        if self.writes.is_empty() {
            let checked_anyway = match self.isolation {
                Isolation::RepeatableReads => true,
                Isolation::ReadCommitted => false,
                // One revision, consistent as it is, and current if it came from a Txn
                // (prefetched, or read back by a failed commit); a cached one or one fixed
                // by a serializable read may be behind, so the check makes it current.
                Isolation::SerializableSnapshot | Isolation::Serializable => {
                    self.view.is_some() || self.snapshot_from_any_member
                }
            };
            return match checked_anyway {
                true => self.check_reads(prefetch).await,
                false => Ok(Outcome::Committed { revision: 0 }),
            };
        }
        let mut conditions = Vec::new();
        if self.isolation != Isolation::ReadCommitted {
            conditions.extend(self.reads.iter().map(|(key, read)| unchanged(key, read)));
        }
        if self.isolation == Isolation::SerializableSnapshot {
            if let Some(snapshot) = self.snapshot {
                // The copy's revision moves only with changes under its prefix, so it may
                // be older than this Stm's own last commit. Any revision from the snapshot
                // to the commit will do here, as the commit checks every read through it:
                // take the newest this Stm has seen, so that its own earlier writes do not
                // count as concurrent ones.
                let since = match self.view {
                    Some(_) => snapshot.max(self.seen),
                    None => snapshot,
                };
                // A key also read is covered already: its read compare pins a mod revision
                // at or below the snapshot.
                let blind = self
                    .writes
                    .keys()
                    .filter(|key| !self.reads.contains_key(*key));
                for key in blind {
                    let untouched = Compare::mod_revision(key.clone(), CompareOp::Less, since + 1);
                    conditions.push(untouched);
                }
            }
        }
        let (writes, cached): (Vec<TxnOp>, Vec<bool>) = self
            .writes
            .into_iter()
            .map(|(key, write)| {
                let cached = self
                    .noted_in
                    .as_ref()
                    .is_some_and(|cache| cache.covers(&key));
                let op = match write {
                    Write::Put { value, lease_id } => {
                        let lease = (lease_id != 0).then(|| PutOptions::new().with_lease(lease_id));
                        TxnOp::put(key, value, lease)
                    }
                    Write::Delete => TxnOp::delete(key, None),
                };
                (op, cached)
            })
            .unzip();
        let refresh = refresh_keys(self.reads.keys(), prefetch);
        let txn = Txn::new()
            .when(conditions)
            .and_then(writes)
            .or_else(gets(&refresh));
        let (kv, limit) = (&self.kv, self.request_timeout);
        let Some(answer) = unless_values_too_large(commit_once(kv, limit, txn).await)? else {
            let read = |key: &[u8]| self.reads.get(key).map(|read| read.mod_revision);
            let pinned = self.isolation.snapshot_reads();
            return newest_changes(kv, limit, &refresh, read, &self.noted_in, pinned).await;
        };
        if !answer.succeeded() {
            return Ok(Outcome::Conflict(read_set(refresh, &answer)));
        }
        let revision = answer.header().map_or(0, |h| h.revision());
        if let Some(cache) = &self.noted_in {
            // Only a write that changed a key under the prefix shows in the copy: not the
            // delete of an absent key.
            let changed = answer
                .op_responses()
                .into_iter()
                .zip(cached)
                .any(|(op, cached)| {
                    cached
                        && match op {
                            TxnOpResponse::Put(_) => true,
                            TxnOpResponse::Delete(deleted) => deleted.deleted() > 0,
                            _ => false,
                        }
                });
            if changed {
                cache.wrote(revision);
            }
        }
        Ok(Outcome::Committed { revision })
    }

    /// Checks that a read-only attempt's reads are still current, with read-only Txns
    /// (which etcd answers without a raft write): one that compares up to
    /// [`ETCD_MAX_TXN_OPS`] keys, and for any further keys, reads of their mod revisions
    /// at the revision it was answered at, compared here (their values could exceed one
    /// answer). If all match, the reads were current at that revision.
    async fn check_reads(self, prefetch: &[Vec<u8>]) -> Result<Outcome> {
        let reads: Vec<(Vec<u8>, Read)> = self.reads.into_iter().collect();
        let (compared, rest) = reads.split_at(reads.len().min(ETCD_MAX_TXN_OPS));
        let refresh = refresh_keys(compared.iter().map(|(key, _)| key), prefetch);
        let conditions: Vec<Compare> = compared
            .iter()
            .map(|(key, read)| unchanged(key, read))
            .collect();
        let txn = Txn::new().when(conditions).or_else(gets(&refresh));
        // Read-only: safe to send again whatever became of an attempt.
        let (kv, limit) = (&self.kv, self.request_timeout);
        let pinned = self.isolation.snapshot_reads();
        let Some(answer) = unless_values_too_large(retry_read_txn(kv, limit, txn).await)? else {
            let read = |key: &[u8]| {
                let read = compared.iter().find(|(read, _)| read.as_slice() == key);
                read.map(|(_, read)| read.mod_revision)
            };
            return newest_changes(kv, limit, &refresh, read, &self.noted_in, pinned).await;
        };
        if !answer.succeeded() {
            return Ok(Outcome::Conflict(read_set(refresh, &answer)));
        }
        let revision = answer.header().map_or(0, |h| h.revision());
        for chunk in rest.chunks(ETCD_MAX_TXN_OPS) {
            let keys = chunk.iter().map(|(key, _)| key.as_slice());
            let now = match mod_revisions_at(&self.kv, self.request_timeout, keys, revision).await {
                Ok((now, _)) => now,
                // Compacted meanwhile: a fresh attempt checks again.
                Err(Error::Etcd(error)) if is_compacted(&error) => {
                    return Ok(Outcome::Compacted(error));
                }
                Err(error) => return Err(error),
            };
            let mut changed: Option<CopyNeeds> = None;
            for ((key, read), now) in chunk.iter().zip(now) {
                if now == read.mod_revision {
                    continue;
                }
                let needs = copy_must_show(
                    &self.noted_in,
                    key,
                    read.mod_revision,
                    now,
                    revision,
                    pinned,
                );
                changed = Some(changed.unwrap_or_default().max(needs));
            }
            if let Some(needs) = changed {
                return Ok(Outcome::Changed {
                    needs,
                    checked_at: revision,
                });
            }
        }
        Ok(Outcome::Committed { revision })
    }
}

/// The compare that `key` still has the mod revision it was read with.
fn unchanged(key: &[u8], read: &Read) -> Compare {
    Compare::mod_revision(key, CompareOp::Equal, read.mod_revision)
}

/// The keys a failed commit reads for the next attempt: those read, then the prefetch keys
/// not read, as many as one Txn may hold.
fn refresh_keys<'a>(
    reads: impl Iterator<Item = &'a Vec<u8>>,
    prefetch: &[Vec<u8>],
) -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = reads.cloned().collect();
    let unread: Vec<Vec<u8>> = prefetch
        .iter()
        .filter(|key| !keys.contains(key))
        .cloned()
        .collect();
    keys.extend(unread);
    keys.truncate(ETCD_MAX_TXN_OPS);
    keys
}

/// For a failed Txn whose values were too large to read back: where `cache`'s copy must be
/// before the next attempt reads from it (see [`copy_must_show`]), from the
/// mod revisions of `keys` read now without values and those the attempt read (`read`:
/// none for a key it did not read, such as a prefetch key, which cannot have failed the
/// Txn). If none of them changed, the Txn failed on a key it only wrote: the revision they
/// were checked at, which this `Stm` then has seen, lets the next attempt's check of that
/// key start there.
async fn newest_changes(
    kv: &Client,
    limit: Duration,
    keys: &[Vec<u8>],
    read: impl Fn(&[u8]) -> Option<i64>,
    cache: &Option<ReadCache>,
    pinned: bool,
) -> Result<Outcome> {
    let latest = 0;
    let asked = keys.iter().map(Vec::as_slice);
    let (now, revision) = mod_revisions_at(kv, limit, asked, latest).await?;
    let changes = keys.iter().zip(now).filter_map(|(key, now)| {
        let read = read(key).filter(|read| *read != now)?;
        Some(copy_must_show(cache, key, read, now, revision, pinned))
    });
    Ok(Outcome::Changed {
        needs: changes.fold(CopyNeeds::default(), CopyNeeds::max),
        checked_at: revision,
    })
}

/// Where `cache`'s copy must be before an attempt reads `key` through it, `key` having been
/// read with mod revision `read` and having mod revision `now` (0: deleted) at
/// `revision`: at the revision of that change, if the copy holds the key (shown by an
/// event) or, at the snapshot levels (`pinned`), if it does not but is read at the copy's
/// revision (passed without an event of its own); anywhere otherwise (read from etcd, it
/// is current). A deletion's revision is not known, only that it is `revision` at the
/// latest: a copy past `read` that no longer holds the key shows a deletion already (its
/// revision now will do, and reading the key as absent there agrees with etcd); any other
/// must reach `revision`.
fn copy_must_show(
    cache: &Option<ReadCache>,
    key: &[u8],
    read: i64,
    now: i64,
    revision: i64,
    pinned: bool,
) -> CopyNeeds {
    let holder = cache.as_ref().filter(|cache| cache.covers(key));
    let changed_at = match (holder, now) {
        (Some(cache), 0) => match cache.view() {
            Some(view) if view.revision >= read && view.mod_revision(key) == 0 => view.revision,
            _ => revision,
        },
        (_, 0) => revision,
        (_, now) => now,
    };
    match holder {
        Some(_) => CopyNeeds {
            shown: changed_at,
            passed: 0,
        },
        None if pinned => CopyNeeds {
            shown: 0,
            passed: changed_at,
        },
        None => CopyNeeds::default(),
    }
}
