//! Following a key or prefix: a view read once, then kept current by a watch.
//!
//! Every watch here starts "now" (start revision 0): etcd registers it at its current
//! revision `W` and reports `W` in the created response. A watch whose start revision is at
//! or below the member's current revision would instead be served by etcd's unsynced path,
//! which catches up only every 100 ms (the "100 ms watch trap"). If the caller's view is
//! older than `W`, the range is read again (at some revision `G >= W`) and only events
//! after `G` are applied. Nothing is missed, and a compacted history never matters, since
//! no such watch starts in the past. A watch from now still lands on the unsynced path when
//! a write reaches etcd between its revision read and the watch's registration: the write
//! then arrives up to 100 ms late. Followers that cannot wait for it (queue waiters) read
//! the range once after opening ([`Follower::reading_after_open`]), which shows it.
//!
//! A broken watch (member killed, connection lost, watch cancelled) is re-opened the same
//! way, with jittered back-off, for as long as the caller keeps asking. So is a silent one:
//! after [`LIVENESS_CHECK`] without a message the member is asked for a progress
//! notification, and if that goes unanswered too (a frozen member keeps its connection
//! open but answers nothing) the watch is re-opened, perhaps through another member. A
//! member cut off from its peers does answer, from its stale state: so after each
//! notification the cluster's revision is read (linearizably, one key counted), and a
//! member still below it at the next notification is left, as is one on which a watch is
//! opened below it (etcd cancels such watches itself, sooner, for clients that require a
//! leader). A follower that must report every change ([`Follower::replaying`]) re-opens
//! from its last revision + 1 instead, and falls back to a re-read only when that history
//! has been compacted or its replay is too large for one answer of the client's.

use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{
    Client, Event, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse, WatchFilterType, WatchOptions,
    WatchResponse, WatchStream,
};

use tokio::time::Instant;

use crate::auth_token::{TOKEN_RENEWALS, renew_token};
use crate::error::{
    ETCD_MAX_TXN_OPS, Error, Result, is_answer_too_large, is_compacted, is_request_too_large,
};
use crate::retry::{ATTEMPT_TIMEOUT, Backoff, MAX_IN_FLIGHT, retry, retry_read_txn};

/// How long a watch may stay silent before its member is asked whether it is alive, and
/// then how long the answer may take before the watch is re-opened (so a quiet watch over
/// round trips longer than this is re-opened again and again).
const LIVENESS_CHECK: Duration = Duration::from_secs(5);
/// How long one request (a read, or opening a watch) is sent again while unanswered
/// before the follower gives up on it and starts over: as long as [`retry`] keeps an
/// attempt in flight, so that a link or a member slower than [`ATTEMPT_TIMEOUT`] still
/// answers. [`Follower::next_within`] gives its requests less.
const REQUEST_LIMIT: Duration = ATTEMPT_TIMEOUT.saturating_mul(MAX_IN_FLIGHT as u32);

/// What changed since the last update.
#[derive(Debug)]
pub(crate) enum Update {
    /// The range was read again: this is its whole content at `revision`.
    Snapshot { kvs: Vec<KeyValue>, revision: i64 },
    /// These events happened after the previous update, in order.
    Events(Vec<Event>),
}

/// Keeps a caller's view of a key or prefix current; see the module docs.
pub(crate) struct Follower {
    client: Client,
    key: Vec<u8>,
    prefix: bool,
    read_options: GetOptions,
    /// The caller's view is current up to this revision.
    revision: i64,
    /// Re-open broken watches from `revision + 1` (replaying what was missed) rather than
    /// from now with a re-read.
    replay: bool,
    /// The history after `revision` was compacted (or is too large to replay in one
    /// answer): the next open reads the range again.
    history_gone: bool,
    /// Events after `revision` were read and dropped: the view must be read again.
    stale: bool,
    watch: Option<WatchStream>,
    /// When the watch last said anything (or was opened, or asked for progress).
    heard_at: Instant,
    /// A progress notification was asked for and has not come yet.
    progress_asked: bool,
    /// A revision the cluster had reached (read linearizably after the member's last
    /// progress notification; 0: none): a member still below it at its next notification,
    /// or when a watch is opened on it, is behind, cut off from its peers perhaps, and its
    /// watch would stay silent. Not the revision of a snapshot: a watch re-opened right
    /// after one could land on a healthy follower a few milliseconds behind it.
    committed: i64,
    backoff: Backoff,
    /// The watch asks etcd to leave out puts (the snapshots still read every key).
    deletes_only: bool,
    /// Why the last attempt to open the watch (or read its snapshot) failed, if none has
    /// succeeded since.
    open_failure: Option<Error>,
    /// How long one request is sent again while unanswered before it is given up.
    request_limit: Duration,
    /// [`TOKEN_RENEWALS`] when the last watch was sent.
    renewals_seen: u64,
    /// Reads the range after opening a watch even when the view is as new as the watch.
    read_after_open: bool,
}

/// What a live watch said, or that it said nothing for too long.
enum Heard {
    Message(Result<Option<WatchResponse>, etcd_client::Error>),
    Silence,
}

impl Follower {
    /// Follows `key` (all keys starting with it if `prefix`), for a caller whose view is
    /// current as of `revision` (0: no view yet, so the first update is a snapshot).
    /// Snapshots are read with `read_options` (the range is added here).
    pub(crate) fn new(
        client: Client,
        key: Vec<u8>,
        prefix: bool,
        read_options: GetOptions,
        revision: i64,
    ) -> Follower {
        Follower {
            client,
            key,
            prefix,
            read_options,
            revision,
            replay: false,
            history_gone: false,
            stale: false,
            watch: None,
            heard_at: Instant::now(),
            progress_asked: false,
            committed: 0,
            backoff: Backoff::new(),
            deletes_only: false,
            open_failure: None,
            request_limit: REQUEST_LIMIT,
            renewals_seen: 0,
            read_after_open: false,
        }
    }

    /// Has the follower read the range after opening a watch even when its view is as new
    /// as the watch, for a caller that must not miss a change for 100 ms. etcd registers a
    /// watch from "now" at the revision it read just before: a write in between leaves the
    /// watch on its unsynced path, whose events come only at its next catch-up, up to 100
    /// ms later (1-3% of the election hand-offs that the benchmark times, where the
    /// leader resigns while the next candidate opens its watch). A read made after the
    /// watch was opened shows such a write.
    pub(crate) fn reading_after_open(mut self) -> Follower {
        self.read_after_open = true;
        self
    }

    /// Has etcd leave puts out of the watch, for a caller that needs only deletions: etcd
    /// then neither encodes nor sends them (a queue's joins, say, which every waiter on
    /// the prefix would otherwise receive).
    pub(crate) fn deletes_only(mut self) -> Follower {
        self.deletes_only = true;
        self
    }

    /// Starts a new view, current as of `revision` and re-read with `read_options`
    /// when needed, keeping the open watch: its events up to `revision` are skipped. If
    /// events after `revision` were already read (and dropped, by [`drain`](Self::drain)),
    /// the next update is a snapshot.
    pub(crate) fn restart_view(&mut self, read_options: GetOptions, revision: i64) {
        self.read_options = read_options;
        self.stale = self.revision > revision;
        self.revision = revision;
    }

    /// Reads the watch and drops what it says until `stop` fires (then hands the follower
    /// back) or the watch fails for good. An open watch must be read: its unread messages
    /// hold HTTP/2 flow-control windows, and a few such watches freeze the whole
    /// connection. A follower whose view must be read again anyway (see
    /// [`restart_view`](Self::restart_view)) closes its watch and hands itself back at once,
    /// as does one left unused for `idle` or once it has heard `events` events; the next
    /// use opens the watch again, with a read if the view is behind.
    pub(crate) async fn drain(
        mut self,
        mut stop: tokio::sync::oneshot::Receiver<()>,
        idle: Duration,
        events: usize,
    ) -> Option<Follower> {
        if self.stale {
            // Its view is read again on the next use, as it would be after re-opening:
            // the watch is not worth keeping, and re-opening it is left to that use.
            self.watch = None;
            return Some(self);
        }
        let idle_until = Instant::now() + idle;
        let mut events_heard = 0;
        while events_heard < events {
            tokio::select! {
                _ = &mut stop => return Some(self),
                () = tokio::time::sleep_until(idle_until) => break,
                update = self.next() => match update {
                    Ok(Update::Events(events)) => events_heard += events.len(),
                    // It broke and was opened again, with a read.
                    Ok(Update::Snapshot { .. }) => {}
                    Err(_) => return None,
                },
            }
        }
        self.watch = None;
        Some(self)
    }

    /// [`next`](Self::next), for at most `limit`, each request (opening the watch, reading
    /// the range) given half of it. Past `limit`, returns the last failure of a request
    /// since the last successful open ([`Error::Etcd`], such as a refused connection), or
    /// [`Error::Timeout`] if none failed, only went unanswered.
    ///
    /// Cancel-safe as `next` is, but a dropped call leaves its shorter request limit.
    pub(crate) async fn next_within(&mut self, limit: Duration) -> Result<Update> {
        self.request_limit = limit / 2;
        self.open_failure = None;
        let next = tokio::time::timeout(limit, self.next()).await;
        self.request_limit = REQUEST_LIMIT;
        match next {
            Ok(update) => update,
            Err(_) => Err(match self.open_failure.take() {
                Some(failed @ Error::Etcd(_)) => failed,
                _ => Error::Timeout {
                    call: "Watch",
                    after: limit,
                },
            }),
        }
    }

    /// Makes re-opened watches replay the events missed while the watch was broken, so
    /// that every change is reported, not only the state after it.
    pub(crate) fn replaying(mut self) -> Follower {
        self.replay = true;
        self
    }

    /// The next change. Transient failures are retried without end (callers bound the
    /// wait themselves, e.g. by their session's `lost()`).
    ///
    /// Errors are the non-transient ones: a watch or read refused by etcd (permissions).
    ///
    /// Cancel-safe: a dropped call loses no events.
    pub(crate) async fn next(&mut self) -> Result<Update> {
        loop {
            if self.stale && self.watch.is_some() {
                return match self.read_snapshot().await {
                    Ok(snapshot) => Ok(snapshot),
                    Err(error) if error.is_transient() => {
                        self.watch = None; // re-opening reads a snapshot too
                        continue;
                    }
                    Err(error) => Err(error),
                };
            }
            let Some(watch) = self.watch.as_mut() else {
                let opened = self.open().await;
                if opened.is_ok() {
                    self.open_failure = None;
                }
                match opened {
                    Ok(Some(snapshot)) => return Ok(snapshot),
                    Ok(None) => continue,
                    Err(error) if error.is_transient() => {
                        tracing::debug!(%error, "cannot open a watch; retrying");
                        self.open_failure = Some(error);
                        self.backoff_once().await;
                        continue;
                    }
                    Err(error) => return Err(error),
                }
            };
            let heard = tokio::select! {
                biased;
                message = watch.message() => Heard::Message(message),
                () = tokio::time::sleep_until(self.heard_at + LIVENESS_CHECK) => Heard::Silence,
            };
            let message = match heard {
                Heard::Message(message) => message,
                Heard::Silence if self.progress_asked => {
                    tracing::debug!("watch silent after a progress request; re-opening");
                    self.watch = None;
                    continue;
                }
                Heard::Silence => {
                    self.progress_asked = watch.request_progress().await.is_ok();
                    self.heard_at = Instant::now();
                    if !self.progress_asked {
                        self.watch = None;
                    }
                    continue;
                }
            };
            self.heard_at = Instant::now();
            let progress_asked = std::mem::take(&mut self.progress_asked);
            match message {
                Ok(Some(answer)) if answer.canceled() => {
                    // Compaction, or the member lost its leader: follow again.
                    tracing::debug!(
                        reason = answer.cancel_reason(),
                        compacted = answer.compact_revision(),
                        "watch cancelled; re-opening"
                    );
                    self.history_gone |= answer.compact_revision() > 0;
                    self.watch = None;
                }
                Ok(Some(answer)) if progress_asked && answer.events().is_empty() => {
                    // The progress notification: the member's revision.
                    let member = answer.header().map(|h| h.revision());
                    if member.is_some_and(|member| member < self.committed) {
                        tracing::debug!(
                            ?member,
                            cluster = self.committed,
                            "watch's member behind the cluster; re-opening"
                        );
                        self.watch = None;
                    } else if let Some(cluster) = self.cluster_revision().await {
                        self.committed = cluster;
                    }
                }
                Ok(Some(answer)) => {
                    // Events come in revision order.
                    let newest = answer.events().last().map_or(0, revision_of);
                    if newest > self.revision {
                        let fresh = |event: &&Event| revision_of(event) > self.revision;
                        let events = answer.events().iter().filter(fresh).cloned().collect();
                        self.revision = newest;
                        self.backoff = Backoff::new();
                        return Ok(Update::Events(events));
                    }
                }
                Err(error) if is_answer_too_large(&error) => {
                    // Replaying the same revisions would bring the same answer again.
                    tracing::debug!(%error, "watch answer too large; reading the range");
                    self.history_gone = true;
                    self.watch = None;
                }
                Ok(None) | Err(_) => {
                    tracing::debug!("watch stream broke; re-opening");
                    self.watch = None;
                    self.backoff_once().await;
                }
            }
        }
    }

    /// Opens a watch: from the last revision + 1 when replaying, otherwise from now,
    /// with a snapshot if the view is older than the watch or stale, or if the follower
    /// reads after opening.
    async fn open(&mut self) -> Result<Option<Update>> {
        let mut options = WatchOptions::new();
        if self.prefix {
            options = options.with_prefix();
        }
        if self.deletes_only {
            options = options.with_filters([WatchFilterType::NoPut]);
        }
        if self.replay && self.revision > 0 && !self.history_gone {
            let options = options.with_start_revision(self.revision + 1);
            let (watch, created) = self.watch_with(options).await?;
            if created.canceled() && created.compact_revision() > 0 {
                self.history_gone = true;
            } else if created.canceled() {
                return Err(self.refusal(&created).await);
            } else {
                self.check_member(&created).await?;
                self.watch = Some(watch);
            }
            return Ok(None);
        }
        let (watch, created) = self.watch_with(options).await?;
        if created.canceled() {
            return Err(self.refusal(&created).await);
        }
        self.check_member(&created).await?;
        let watched_from = created.header().map_or(0, |h| h.revision());
        if watched_from <= self.revision && !self.stale && !self.read_after_open {
            self.watch = Some(watch);
            return Ok(None);
        }
        // The watch is stored only after the read: a call cancelled during the read must
        // not keep a watch that skips the events between the old view and its start.
        let snapshot = self.read_snapshot().await?;
        self.watch = Some(watch);
        Ok(Some(snapshot))
    }

    /// Reads the whole range (linearizably, so at or after everything the watch has
    /// delivered) and makes it the view.
    async fn read_snapshot(&mut self) -> Result<Update> {
        let options = self.range(self.read_options.clone());
        let key = &self.key;
        let read = retry(&self.client, "Range", self.request_limit, |client| {
            let (mut kv, key, options) = (client.kv_client(), key.clone(), options.clone());
            async move { kv.get(key, Some(options)).await }
        });
        let (kvs, revision) = match read.await {
            Ok(mut answer) => (
                answer.take_kvs(),
                answer.header().map_or(0, |h| h.revision()),
            ),
            Err(Error::Etcd(error)) if is_answer_too_large(&error) => self.read_in_parts().await?,
            Err(error) => return Err(error),
        };
        if revision > 0 {
            self.revision = revision;
        }
        // A replay can start from the new revision (until the read, one must not).
        self.stale = false;
        self.history_gone = false;
        Ok(Update::Snapshot {
            kvs,
            revision: self.revision,
        })
    }

    /// Reads a range too large for one answer of the client's (its values, or even just
    /// its keys, are over the size limit together), at one revision: its keys a page at a
    /// time, then their values in Txns of Gets pinned to that revision, halving a page or a
    /// batch whose answer (or, with long keys, whose request) is still too large.
    /// Compacted meanwhile, it starts again. It reads the whole range with values whatever
    /// the read options: `observe` and `ReadCache` want that, and a queue's waiter, which
    /// reads keys only up to its own, ignores the rest.
    async fn read_in_parts(&self) -> Result<(Vec<KeyValue>, i64)> {
        loop {
            match self.read_parts().await {
                Err(Error::Etcd(error)) if is_compacted(&error) => {
                    tracing::debug!(%error, "range compacted while read in parts; reading again");
                }
                read => return read,
            }
        }
    }

    async fn read_parts(&self) -> Result<(Vec<KeyValue>, i64)> {
        let kv = &self.client;
        let (keys, revision) = self.list_keys(kv).await?;
        let at = GetOptions::new().with_revision(revision);
        let (mut kvs, mut done, mut batch) = (Vec::new(), 0, ETCD_MAX_TXN_OPS);
        while done < keys.len() {
            let take = batch.min(keys.len() - done);
            let gets = keys[done..done + take]
                .iter()
                .map(|key| TxnOp::get(key.clone(), Some(at.clone())))
                .collect::<Vec<_>>();
            let txn = Txn::new().and_then(gets);
            match retry_read_txn(kv, self.request_limit, txn).await {
                Ok(answer) => {
                    for op in answer.op_responses() {
                        if let TxnOpResponse::Get(mut get) = op {
                            kvs.append(&mut get.take_kvs());
                        }
                    }
                    done += take;
                }
                // Its answer, or with long keys the request itself, over a size limit.
                Err(Error::Etcd(error))
                    if (is_answer_too_large(&error) || is_request_too_large(&error))
                        && take > 1 =>
                {
                    batch = take / 2;
                }
                Err(error) => return Err(error),
            }
        }
        Ok((kvs, revision))
    }

    /// The keys of the range, a page at a time, at the revision of the first page.
    async fn list_keys(&self, kv: &Client) -> Result<(Vec<Vec<u8>>, i64)> {
        const FIRST_PAGE: i64 = 10_000;
        let (mut keys, mut from) = (Vec::new(), self.key.clone());
        let (mut revision, mut page) = (0, FIRST_PAGE);
        loop {
            let mut options = GetOptions::new()
                .with_keys_only()
                .with_limit(page)
                .with_revision(revision);
            if self.prefix {
                options = options.with_range(range_end(&self.key));
            }
            let page_from = retry(kv, "Range", self.request_limit, |client| {
                let (mut kv, from, options) = (client.kv_client(), from.clone(), options.clone());
                async move { kv.get(from, Some(options)).await }
            });
            match page_from.await {
                Ok(answer) => {
                    if revision == 0 {
                        revision = answer.header().map_or(0, |h| h.revision());
                    }
                    keys.extend(answer.kvs().iter().map(|kv| kv.key().to_vec()));
                    match (answer.more(), keys.last()) {
                        (true, Some(last)) => from = [last.as_slice(), &[0]].concat(),
                        _ => return Ok((keys, revision)),
                    }
                }
                Err(Error::Etcd(error)) if is_answer_too_large(&error) && page > 1 => {
                    page /= 2;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// `options` over the followed key or range.
    fn range(&self, options: GetOptions) -> GetOptions {
        match self.prefix {
            true => options.with_prefix(),
            false => options,
        }
    }

    /// Opens a watch and reads its first answer, which says whether it was created; an
    /// open unanswered after [`ATTEMPT_TIMEOUT`] is sent again (a frozen member would
    /// never answer), the earlier ones staying in flight, until the request limit.
    async fn watch_with(&mut self, options: WatchOptions) -> Result<(WatchStream, WatchResponse)> {
        let key = &self.key;
        self.renewals_seen = TOKEN_RENEWALS.load(Ordering::SeqCst);
        let opened = retry(&self.client, "Watch", self.request_limit, |client| {
            let (mut watches, key) = (client.watch_client(), key.clone());
            let options = options.clone();
            async move {
                let mut watch = watches.watch(key, Some(options)).await?;
                let created = watch.message().await?.ok_or_else(|| {
                    etcd_client::Error::WatchError("watch closed at creation".into())
                })?;
                Ok((watch, created))
            }
        })
        .await?;
        self.heard_at = Instant::now();
        self.progress_asked = false;
        Ok(opened)
    }

    /// Why etcd refused to create a watch. A refusal of the client's auth token (expired:
    /// etcd's simple tokens last `--auth-token-ttl`, 5 min, from their last use, and are
    /// unknown to a member that restarted; or issued before a change of the auth store)
    /// comes in the created answer, not as a gRPC error, so etcd-client never renews the
    /// token for it: renew it here and try again, as Go's client does. Any other refusal
    /// (e.g. permission denied) is not worth retrying.
    async fn refusal(&self, created: &WatchResponse) -> Error {
        let reason = created.cancel_reason();
        if !is_stale_token(reason) {
            return refused(created);
        }
        tracing::debug!(
            reason,
            "watch refused for its auth token; renewing the token"
        );
        // Bounded as the follower's other requests are: a frozen member never answers.
        // Renewed since this watch was sent (by another request, likely of this client):
        // the new token is tried first.
        let renewed = tokio::time::timeout(
            self.request_limit,
            renew_token(&self.client, self.renewals_seen),
        );
        match renewed.await {
            // Transient: the watch is opened again, with the new token.
            Ok(Ok(())) => Error::Etcd(etcd_client::Error::WatchError(format!(
                "watch refused: {reason}; auth token renewed"
            ))),
            Ok(Err(error)) => Error::Etcd(error),
            Err(_) => Error::Timeout {
                call: "Authenticate",
                after: self.request_limit,
            },
        }
    }

    /// Fails (transiently: the watch is opened again, after a back-off) if a new watch's
    /// member is at a revision below one the cluster had reached before, unless the
    /// cluster's revision, read again, has fallen below that one (the cluster was restored
    /// from an older snapshot, so its members are not behind).
    async fn check_member(&mut self, created: &WatchResponse) -> Result<()> {
        let Some(member) = created.header().map(|h| h.revision()) else {
            return Ok(());
        };
        if member >= self.committed {
            return Ok(());
        }
        match self.cluster_revision().await {
            Some(cluster) if cluster < self.committed => {
                self.committed = cluster;
                Ok(())
            }
            _ => Err(Error::Etcd(etcd_client::Error::WatchError(format!(
                "watch opened on a member at revision {member}, behind the cluster's {}",
                self.committed
            )))),
        }
    }

    /// The revision the cluster has reached, read linearizably through any member (so the
    /// raft leader confirms it), or `None` if the read fails. Reads one key, counting only.
    async fn cluster_revision(&self) -> Option<i64> {
        let key = &self.key;
        let read = retry(&self.client, "Range", self.request_limit, |client| {
            let (mut kv, key) = (client.kv_client(), key.clone());
            async move { kv.get(key, Some(GetOptions::new().with_count_only())).await }
        });
        read.await.ok()?.header().map(|h| h.revision())
    }

    async fn backoff_once(&mut self) {
        tokio::time::sleep(self.backoff.next_delay()).await;
    }
}

/// The end of the range of keys starting with `prefix` (etcd's `"\0"`: no end, if every
/// byte of it is `0xff`).
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Whether a watch was refused for the client's auth token rather than for what it
/// watches (etcd's `ErrGRPCInvalidAuthToken` and `ErrGRPCAuthOldRevision`).
fn is_stale_token(reason: &str) -> bool {
    reason.contains("invalid auth token") || reason.contains("revision of auth store is old")
}

/// etcd refused to create a watch (e.g. permission denied): not worth retrying.
fn refused(created: &WatchResponse) -> Error {
    let reason = created.cancel_reason();
    let code = if reason.contains("permission denied") {
        tonic::Code::PermissionDenied
    } else {
        tonic::Code::FailedPrecondition
    };
    Error::Etcd(etcd_client::Error::GRpcStatus(tonic::Status::new(
        code,
        format!("watch refused: {reason}"),
    )))
}

/// Resolves once `key` no longer has create revision `incarnation`, following it from a
/// view as of `revision` (0: read it first). The watch carries only the key's deletion,
/// which is the only thing that ends an incarnation.
///
/// Errors: non-transient ones from watching or reading the key (such as permission
/// denied).
pub(crate) async fn until_gone(
    client: &Client,
    key: &[u8],
    incarnation: i64,
    revision: i64,
) -> Result<()> {
    let read = GetOptions::new().with_keys_only();
    let mut follower =
        Follower::new(client.clone(), key.to_vec(), false, read, revision).deletes_only();
    loop {
        match follower.next().await? {
            Update::Snapshot { kvs, .. }
                if kvs.iter().any(|kv| kv.create_revision() == incarnation) => {}
            // Gone from a fresh read, or deleted: only deletions come as events.
            _ => return Ok(()),
        }
    }
}

/// The revision an event happened at (a delete's key-value carries the deletion revision).
pub(crate) fn revision_of(event: &Event) -> i64 {
    event.kv().map_or(0, KeyValue::mod_revision)
}

#[cfg(test)]
mod tests {
    use super::range_end;

    #[test]
    fn a_range_end_is_the_first_key_after_every_key_with_the_prefix() {
        assert_eq!(range_end(b"a/"), b"a0");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff\xff"), b"\0");
    }
}
