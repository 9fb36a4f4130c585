//! [`Observe`]: the stream of an election's leaders, followed through one watch.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use etcd_client::{Client, Event, EventType, GetOptions};
use futures::Stream;
use futures::stream::BoxStream;

use super::{Leader, empty_name};
use crate::error::Result;
use crate::retry::Backoff;
use crate::session::prefix_of;
use crate::watcher::{Follower, Update, revision_of};

/// The stream returned by [`Election::observe`]: the election's leader (`None` when nobody
/// leads) now, at every change of leader and at every write of its key (each proclaim), as
/// `Result<Option<Leader>>` items. It never ends by itself, except after the one error
/// item of an empty name.
///
/// `Observe` is [`Unpin`], so `next()` from [`futures::StreamExt`] needs no pinning, and it
/// can be kept in a struct or moved into a task. Dropping it closes its watch. Go's
/// `Election.Observe` returns a channel of `GetResponse`s instead, closed when its context
/// ends.
///
/// [`Election::observe`]: super::Election::observe
#[must_use = "streams do nothing unless polled"]
pub struct Observe {
    leaders: BoxStream<'static, Result<Option<Leader>>>,
}

impl Observe {
    pub(super) fn new(client: Client, name: &[u8]) -> Observe {
        let follower =
            Follower::new(client, prefix_of(name), true, GetOptions::new(), 0).replaying();
        let observer = Observer {
            empty_name: name.is_empty(),
            follower,
            candidates: HashMap::new(),
            pending: VecDeque::new(),
            reported: None,
            failing: None,
        };
        let leaders = futures::stream::unfold(Some(observer), |observer| async move {
            let mut observer = observer?;
            let item = observer.next().await;
            // No retry makes an empty name valid: the stream ends after saying so.
            let going_on = (!observer.empty_name).then_some(observer);
            Some((item, going_on))
        });
        Observe {
            leaders: Box::pin(leaders),
        }
    }
}

impl Stream for Observe {
    type Item = Result<Option<Leader>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.leaders.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for Observe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observe").finish_non_exhaustive()
    }
}

/// The state behind [`Election::observe`](super::Election::observe).
struct Observer {
    empty_name: bool,
    follower: Follower,
    candidates: HashMap<Vec<u8>, Leader>,
    /// Events received but not applied yet: they are applied one revision at a time, so
    /// that each change of leader, and each write of its key, is reported even when
    /// several arrive together.
    pending: VecDeque<Event>,
    /// The last leader reported (`None` before the first report).
    reported: Option<Option<Leader>>,
    /// Set after yielding an error: wait before trying again.
    failing: Option<Backoff>,
}

impl Observer {
    async fn next(&mut self) -> Result<Option<Leader>> {
        if self.empty_name {
            return Err(empty_name());
        }
        if let Some(backoff) = self.failing.as_mut() {
            tokio::time::sleep(backoff.next_delay()).await;
        }
        loop {
            if self.pending.is_empty() {
                match self.follower.next().await {
                    Ok(Update::Snapshot { kvs, .. }) => {
                        self.candidates = kvs
                            .iter()
                            .map(|kv| (kv.key().to_vec(), Leader::from_kv(kv)))
                            .collect();
                    }
                    Ok(Update::Events(events)) => self.pending.extend(events),
                    Err(error) => {
                        self.failing.get_or_insert_with(Backoff::new);
                        return Err(error);
                    }
                }
                self.failing = None;
            }
            self.apply_one_revision();
            // Candidates one Txn created tie: the lowest key of them leads, whatever the
            // map's order (etcd's sorted read in `leader()` does not break ties so in
            // general, only in an election of a few keys).
            let leader = self
                .candidates
                .values()
                .min_by_key(|candidate| (candidate.create_revision, &candidate.key))
                .cloned();
            if self.reported.as_ref() != Some(&leader) {
                self.reported = Some(leader.clone());
                return Ok(leader);
            }
        }
    }

    /// Applies the pending events of the oldest pending revision.
    fn apply_one_revision(&mut self) {
        let Some(revision) = self.pending.front().map(revision_of) else {
            return;
        };
        while self.pending.front().map(revision_of) == Some(revision) {
            let Some(event) = self.pending.pop_front() else {
                break;
            };
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => {
                    self.candidates
                        .insert(kv.key().to_vec(), Leader::from_kv(kv));
                }
                EventType::Delete => {
                    self.candidates.remove(kv.key());
                }
            }
        }
    }
}
