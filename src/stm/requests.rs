//! The requests an STM transaction sends: reads in one read-only Txn, and the commit.

use std::time::Duration;

use etcd_client::{Client, GetOptions, Txn, TxnOp, TxnOpResponse, TxnResponse};

use super::{Fresh, Read};
use crate::auth_token::OldToken;
use crate::error::{Error, Result, is_answer_too_large, was_not_applied};
use crate::retry::{Backoff, deadline_after, retry_read_txn};

/// Sends the commit Txn, re-sending it only when etcd certainly did not apply it (the
/// connection was refused, no leader, too many requests): a commit whose outcome is
/// unknown is not sent twice, nor is one sent at or after the deadline. A refusal that
/// leaves no time for another attempt is returned as it is; an attempt unanswered at the
/// deadline gives [`Error::Timeout`], as it may have been applied.
pub(super) async fn commit_once(kv: &Client, limit: Duration, txn: Txn) -> Result<TxnResponse> {
    let deadline = deadline_after(limit);
    let mut backoff = Backoff::new();
    let mut old_token = OldToken::new();
    loop {
        let answer = tokio::time::timeout_at(deadline, kv.kv_client().txn(txn.clone())).await;
        match answer {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(error)) if was_not_applied(&error) => {
                old_token.renew_if_refused(kv, &error, deadline).await;
                let resend_at = tokio::time::Instant::now() + backoff.next_delay();
                tokio::time::sleep_until(resend_at.min(deadline)).await;
                if tokio::time::Instant::now() >= deadline {
                    return Err(Error::Etcd(error));
                }
                tracing::debug!(%error, "STM commit not applied; sending again");
            }
            Ok(Err(error)) => return Err(Error::Etcd(error)),
            Err(_) => {
                return Err(Error::Timeout {
                    call: "Txn",
                    after: limit,
                });
            }
        }
    }
}

/// The answer to a Txn whose success branch holds only writes, which answer in a few bytes
/// each: `None` if it was over the client's size limit, which only the values its failure
/// branch reads back can make it: then the Txn failed.
pub(super) fn unless_values_too_large(answer: Result<TxnResponse>) -> Result<Option<TxnResponse>> {
    match answer {
        Ok(answer) => Ok(Some(answer)),
        Err(Error::Etcd(error)) if is_answer_too_large(&error) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Reads `keys` in one Txn, at one revision; nothing if their values are over the client's
/// answer size limit together (the attempt then reads them one by one).
pub(super) async fn read_many(kv: &Client, limit: Duration, keys: Vec<Vec<u8>>) -> Result<Fresh> {
    match retry_read_txn(kv, limit, Txn::new().and_then(gets(&keys))).await {
        Ok(answer) => Ok(read_set(keys, &answer)),
        Err(Error::Etcd(error)) if is_answer_too_large(&error) => Ok(Fresh::default()),
        Err(error) => Err(error),
    }
}

/// The mod revisions of `keys` at `revision` (0: the latest; 0 for an absent key), in one
/// Txn, without their values; with etcd's revision when it answered.
pub(super) async fn mod_revisions_at<'a>(
    kv: &Client,
    limit: Duration,
    keys: impl Iterator<Item = &'a [u8]>,
    revision: i64,
) -> Result<(Vec<i64>, i64)> {
    let at = GetOptions::new().with_revision(revision).with_keys_only();
    let gets = keys
        .map(|key| TxnOp::get(key, Some(at.clone())))
        .collect::<Vec<_>>();
    let answer = retry_read_txn(kv, limit, Txn::new().and_then(gets)).await?;
    let read_at = answer.header().map_or(revision, |h| h.revision());
    let revisions = answer.op_responses().into_iter().filter_map(|op| match op {
        TxnOpResponse::Get(get) => Some(get.kvs().first().map_or(0, |kv| kv.mod_revision())),
        _ => None,
    });
    Ok((revisions.collect(), read_at))
}

/// Pairs `keys` with the Get answers of a Txn, in order.
pub(super) fn read_set(keys: Vec<Vec<u8>>, answer: &TxnResponse) -> Fresh {
    let gets = answer.op_responses().into_iter().filter_map(|op| match op {
        TxnOpResponse::Get(get) => Some(Read::from_answer(&get)),
        _ => None,
    });
    Fresh {
        values: keys.into_iter().zip(gets).collect(),
        revision: answer.header().map_or(0, |h| h.revision()),
    }
}

/// A Get of each of `keys`, in order.
pub(super) fn gets(keys: &[Vec<u8>]) -> Vec<TxnOp> {
    keys.iter()
        .map(|key| TxnOp::get(key.clone(), None))
        .collect()
}
