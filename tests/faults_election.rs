//! Elections under the fault schedule on a 3-member cluster: leaders rotate and fail
//! over, no two leaders ever write in one term, and observers end on the true leader.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::faults::{Isolation, inflict, resilient_client, schedule};
use common::{millis, read, secs, unique, within};
use etcd_client::{Client, GetOptions, SortOrder, SortTarget, Txn, TxnOp};
use etcd_concurrency::testing::EtcdCluster;
use etcd_concurrency::{Election, Session};
use futures::StreamExt;

const TTL: u64 = 2;
const CANDIDATES: usize = 3;

#[derive(Default)]
struct Tally {
    terms: AtomicU64,
    beats: AtomicU64,
    stop: AtomicBool,
}

/// Campaign, then write fenced heartbeats while leading (for at most a second), then
/// resign; until told to stop.
async fn candidate(id: usize, client: Client, prefix: String, tally: Arc<Tally>) {
    let name = format!("{prefix}/election");
    let mut beat = 0;
    while !tally.stop.load(Ordering::SeqCst) {
        let built = Session::builder(client.clone()).ttl(secs(TTL)).build();
        let Ok(Ok(session)) = tokio::time::timeout(secs(5), built).await else {
            tokio::time::sleep(millis(100)).await;
            continue;
        };
        let election = Election::new(&session, &name);
        while !tally.stop.load(Ordering::SeqCst) && !session.is_lost() {
            let campaign = tokio::time::timeout(secs(5), election.campaign(format!("c{id}")));
            let Ok(Ok(leadership)) = campaign.await else {
                continue;
            };
            tally.terms.fetch_add(1, Ordering::SeqCst);
            let job = async {
                let mut client = client.clone();
                for _ in 0..20 {
                    beat += 1;
                    let write =
                        Txn::new()
                            .when([leadership.ownership_compare()])
                            .and_then([TxnOp::put(
                                format!("{prefix}/beats/{id}-{beat}"),
                                format!("{} c{id}", leadership.fencing_token()),
                                None,
                            )]);
                    let written = tokio::time::timeout(secs(5), client.txn(write)).await;
                    if matches!(written, Ok(Ok(ref answer)) if answer.succeeded()) {
                        tally.beats.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(millis(50)).await;
                }
            };
            leadership.while_leading(job).await;
            let _ = tokio::time::timeout(secs(5), leadership.resign()).await;
        }
        let _ = tokio::time::timeout(secs(5), session.close()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_never_overlap_and_observers_end_on_the_true_leader() {
    let cluster = EtcdCluster::start(3).await;
    let isolation = Isolation::new(&cluster).await;
    let prefix = unique("faults-election");
    let tally = Arc::new(Tally::default());

    let observing = resilient_client(&cluster.endpoints()).await;
    let watcher = Session::builder(observing.clone())
        .ttl(secs(30))
        .build()
        .await
        .unwrap();
    let election = Election::new(&watcher, format!("{prefix}/election"));
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let observer = tokio::spawn({
        let election = election.clone();
        async move {
            let mut leaders = election.observe();
            while let Some(leader) = leaders.next().await {
                if seen_tx.send(leader).is_err() {
                    return;
                }
            }
        }
    });

    let mut candidates = Vec::new();
    for id in 0..CANDIDATES {
        let client = isolation.worker_client(&cluster, id).await;
        candidates.push(tokio::spawn(candidate(
            id,
            client,
            prefix.clone(),
            tally.clone(),
        )));
    }
    let progress = || tally.beats.load(Ordering::SeqCst);
    let report = inflict(
        &cluster,
        Some(&isolation),
        &schedule(secs(TTL)),
        progress,
        10,
    )
    .await;
    tally.stop.store(true, Ordering::SeqCst);
    within(secs(30), async {
        for candidate in candidates {
            candidate.await.unwrap();
        }
    })
    .await;

    let client = cluster.client().await;
    let sorted = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend);
    let beats = read(&client, format!("{prefix}/beats/"), Some(sorted)).await;
    let mut terms = HashSet::new();
    let mut last_term = 0;
    for kv in beats.kvs() {
        let value = std::str::from_utf8(kv.value()).unwrap();
        let (term, _who) = value.split_once(' ').unwrap();
        let term: u64 = term.parse().unwrap();
        assert!(
            term >= last_term,
            "a write of term {term} came after term {last_term}"
        );
        last_term = term;
        terms.insert(term);
    }
    println!(
        "terms {}, fenced heartbeats {} in {} terms, faults {}:\n  {}",
        tally.terms.load(Ordering::SeqCst),
        beats.kvs().len(),
        terms.len(),
        report.len(),
        report.join("\n  ")
    );
    assert!(terms.len() >= 4, "leadership should have changed hands");

    // A last, stable leader: the observer must end on it.
    let last = Election::new(&watcher, format!("{prefix}/election"));
    let leading = within(secs(10), last.campaign("last")).await.unwrap();
    within(secs(10), async {
        loop {
            let Ok(Some(leader)) = seen.recv().await.expect("the observer ended") else {
                continue;
            };
            if leader.key() == leading.key() && leader.value() == b"last" {
                return;
            }
        }
    })
    .await;
    assert_eq!(election.leader().await.unwrap().unwrap().value(), b"last");
    leading.resign().await.unwrap();
    observer.abort();
    // Every candidate closed its session (or lost it to expiry): no candidacy is left.
    let candidacies = format!("{prefix}/election/");
    within(secs(TTL + 5), common::no_keys_under(&client, &candidacies)).await;
}
