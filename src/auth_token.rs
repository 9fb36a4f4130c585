//! Renewing auth tokens that etcd refuses as old ("revision of auth store is old"), once
//! per token across the process's requests rather than once per request.

use std::sync::atomic::{AtomicU64, Ordering};

use etcd_client::Client;
use tokio::time::Instant;

use crate::error::is_auth_old_revision;

/// How many auth tokens this process has renewed (for requests refused for their token).
pub(crate) static TOKEN_RENEWALS: AtomicU64 = AtomicU64::new(0);
/// Taken while renewing a token: the requests refused at once for one token (say, every
/// waiter and observer of a client whose member restarted, or every request in flight when
/// the auth store changed) renew it once, not each, as etcd-client's own renewals do; each
/// renewal is a bcrypt hash on etcd, and in etcd 3.4 a raft proposal.
static RENEWING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Renews `client`'s auth token, unless a token was renewed since [`TOKEN_RENEWALS`] was
/// `seen` (likely this client's: a renewal of another client's costs one more refusal).
pub(crate) async fn renew_token(client: &Client, seen: u64) -> Result<(), etcd_client::Error> {
    let _turn = RENEWING.lock().await;
    if TOKEN_RENEWALS.load(Ordering::SeqCst) != seen {
        return Ok(());
    }
    client.refresh_token().await?;
    TOKEN_RENEWALS.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Renews a client's auth token for a request that etcd keeps refusing for it ("revision of
/// auth store is old"). A simple token (etcd's default) is as good as new after such a
/// refusal (the request met a change of the auth store while it was served) and the
/// request is sent again as it is; a JWT carries the auth store revision it was issued at,
/// so every request made with it is refused after any change of users, roles or
/// permissions, until the client authenticates again: etcd-client renews a token only
/// when etcd calls it invalid. Go's client renews at the first such refusal; here only at
/// the third of a request, as a renewal is a bcrypt hash and a raft entry on etcd, which
/// loops while the auth store keeps changing.
pub(crate) struct OldToken {
    refusals: u32,
    /// [`TOKEN_RENEWALS`] when the request was first sent, or last renewed its token.
    seen: u64,
}

impl OldToken {
    pub(crate) fn new() -> OldToken {
        OldToken {
            refusals: 0,
            seen: TOKEN_RENEWALS.load(Ordering::SeqCst),
        }
    }

    /// Notes that a request failed with `error`, and renews `client`'s token (trying
    /// until `until`) if etcd refused it for its token often enough.
    pub(crate) async fn renew_if_refused(
        &mut self,
        client: &Client,
        error: &etcd_client::Error,
        until: Instant,
    ) {
        if !is_auth_old_revision(error) {
            return;
        }
        self.refusals += 1;
        if self.refusals < 3 {
            return;
        }
        match tokio::time::timeout_at(until, renew_token(client, self.seen)).await {
            Ok(Ok(())) => tracing::debug!(%error, "auth token renewed"),
            Ok(Err(failed)) => tracing::debug!(%failed, "cannot renew the auth token"),
            Err(_) => tracing::debug!("no answer to renewing the auth token"),
        }
        self.seen = TOKEN_RENEWALS.load(Ordering::SeqCst);
    }
}
