//! STM transfers under the fault schedule on a 3-member cluster: they go on across member
//! kills, a paused leader, a leader cut off from its peers and a client cut off, and the
//! money is conserved.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::faults::{Isolation, inflict, schedule};
use common::{amount, move_a_quarter, read, secs, two_accounts, unique, within};
use etcd_client::{Client, GetOptions};
use etcd_concurrency::Stm;
use etcd_concurrency::testing::EtcdCluster;

const ACCOUNTS: usize = 8;
const WORKERS: usize = 6;
const OPENING_BALANCE: u64 = 1000;

#[derive(Default)]
struct Tally {
    commits: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

async fn transfers(client: Client, prefix: String, tally: Arc<Tally>) {
    let stm = Stm::new(client);
    while !tally.stop.load(Ordering::SeqCst) {
        let (from, to) = two_accounts(ACCOUNTS);
        let (from, to) = (format!("{prefix}/{from}"), format!("{prefix}/{to}"));
        let transfer = stm.run(async move |tx| move_a_quarter(tx, &from, &to).await);
        match tokio::time::timeout(secs(10), transfer).await {
            Ok(Ok(())) => tally.commits.fetch_add(1, Ordering::SeqCst),
            _ => tally.errors.fetch_add(1, Ordering::SeqCst),
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_go_on_through_faults_and_conserve_money() {
    let cluster = EtcdCluster::start(3).await;
    let isolation = Isolation::new(&cluster).await;
    let prefix = unique("faults-stm");
    let setup = cluster.client().await;
    for i in 0..ACCOUNTS {
        let key = format!("{prefix}/{i}");
        setup
            .clone()
            .put(key, OPENING_BALANCE.to_string(), None)
            .await
            .unwrap();
    }
    let tally = Arc::new(Tally::default());
    let mut workers = Vec::new();
    for id in 0..WORKERS {
        let client = isolation.worker_client(&cluster, id).await;
        workers.push(tokio::spawn(transfers(
            client,
            prefix.clone(),
            tally.clone(),
        )));
    }
    let progress = || tally.commits.load(Ordering::SeqCst);
    let report = inflict(&cluster, Some(&isolation), &schedule(secs(2)), progress, 20).await;
    tally.stop.store(true, Ordering::SeqCst);
    within(secs(30), async {
        for worker in workers {
            worker.await.unwrap();
        }
    })
    .await;
    let accounts = read(
        &setup,
        format!("{prefix}/"),
        Some(GetOptions::new().with_prefix()),
    )
    .await;
    let total: u64 = accounts
        .kvs()
        .iter()
        .map(|kv| amount(Some(kv.value().to_vec())))
        .sum();
    println!(
        "commits {}, failed transfers {}, faults {}:\n  {}",
        tally.commits.load(Ordering::SeqCst),
        tally.errors.load(Ordering::SeqCst),
        report.len(),
        report.join("\n  ")
    );
    assert_eq!(
        total,
        OPENING_BALANCE * ACCOUNTS as u64,
        "money was created or destroyed"
    );
}

/// A `ReadCache` on the isolated worker's client (cut off in the schedule, besides the
/// member kills and the paused leader) while a writer puts and deletes keys under its
/// prefix: once the faults are over, the copy shows exactly what etcd holds, and its
/// transactions never read a state that never existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_converges_with_etcd_through_faults() {
    use etcd_concurrency::{Error, Isolation as Level, ReadCache};
    const KEYS: usize = 8;
    let cluster = EtcdCluster::start(3).await;
    let isolation = Isolation::new(&cluster).await;
    let prefix = unique("faults-cache");
    let keys: Vec<String> = (0..KEYS).map(|i| format!("{prefix}/{i}")).collect();
    let setup = cluster.client().await;
    for key in &keys {
        setup.clone().put(key.as_str(), "0", None).await.unwrap();
    }
    let cache_client = isolation.worker_client(&cluster, 0).await;
    let cache = ReadCache::watch(cache_client.clone(), prefix.as_str())
        .await
        .unwrap();
    let tally = Arc::new(Tally::default());
    let writer = {
        let (client, keys, tally) = (
            isolation.worker_client(&cluster, 1).await,
            keys.clone(),
            tally.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0u64;
            while !tally.stop.load(Ordering::SeqCst) {
                n += 1;
                let key = keys[(n as usize * 7) % KEYS].clone();
                let write = async {
                    let mut kv = client.kv_client();
                    if n % 5 == 0 {
                        kv.delete(key, None).await.map(drop)
                    } else {
                        kv.put(key, n.to_string(), None).await.map(drop)
                    }
                };
                match tokio::time::timeout(secs(3), write).await {
                    Ok(Ok(())) => tally.commits.fetch_add(1, Ordering::SeqCst),
                    _ => tally.errors.fetch_add(1, Ordering::SeqCst),
                };
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };
    let progress = || tally.commits.load(Ordering::SeqCst);
    let report = inflict(&cluster, Some(&isolation), &schedule(secs(2)), progress, 20).await;
    tally.stop.store(true, Ordering::SeqCst);
    within(secs(30), writer).await.unwrap();
    println!("{}", report.join("\n"));
    // A last write, and the copy must show it.
    let marker = format!("{prefix}/marker");
    let last = setup
        .clone()
        .put(marker.as_str(), "end", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    within(secs(30), async {
        while cache.revision() < last {
            tokio::time::sleep(common::millis(20)).await;
        }
    })
    .await;
    // ReadCommitted checks nothing: what it returns is the copy.
    let stm = Stm::new(cache_client)
        .isolation(Level::ReadCommitted)
        .read_cache(cache.clone());
    let copy = stm
        .run(async |tx| {
            let mut values = Vec::new();
            for key in &keys {
                values.push(tx.get(key).await?);
            }
            Ok::<_, Error>(values)
        })
        .await
        .unwrap();
    let mut current = Vec::new();
    for key in &keys {
        let answer = read(&setup, key.as_str(), None).await;
        current.push(answer.kvs().first().map(|kv| kv.value().to_vec()));
    }
    assert_eq!(copy, current, "the copy differs from etcd");
    assert!(cache.revision() >= last);
}
