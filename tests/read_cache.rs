//! `ReadCache`: STM reads from a watched copy of a prefix, against real etcd.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Instant;

use common::{
    MIB, THROUGH_TWO_PATHS, TWO_PATH_REQUEST_TIMEOUT, amount, millis, move_a_quarter, put_five_mib,
    put_many, read, secs, task_baseline, tasks_back_to, total, transfer_concurrently,
    two_path_client, unique, value_bytes, within,
};
use etcd_client::{Client, Txn, TxnOp};
use etcd_concurrency::testing::{EtcdCluster, Proxy};
use etcd_concurrency::{Error, Isolation, ReadCache, Stm, StmTxn};

async fn put(client: &Client, key: &str, value: &str) -> i64 {
    let answer = client.clone().put(key, value, None).await.unwrap();
    answer.header().unwrap().revision()
}

async fn value(client: &Client, key: &str) -> Option<Vec<u8>> {
    let answer = read(client, key, None).await;
    answer.kvs().first().map(|kv| kv.value().to_vec())
}

/// An `Stm` reading the keys under `prefix` from a `ReadCache` of its own.
async fn cached_stm(client: &Client, prefix: &str) -> Stm {
    let cache = ReadCache::watch(client.clone(), prefix).await.unwrap();
    Stm::new(client.clone()).read_cache(cache)
}

/// The sum of the amounts under `keys`, read in `tx`.
async fn sum(tx: &mut StmTxn, keys: &[String]) -> Result<u64, Error> {
    let mut sum = 0;
    for key in keys {
        sum += amount(tx.get(key).await?);
    }
    Ok(sum)
}

/// Waits until `cache` has applied every change up to `revision`.
async fn caught_up(cache: &ReadCache, revision: i64) {
    within(secs(5), async {
        while cache.revision() < revision {
            tokio::time::sleep(millis(5)).await;
        }
    })
    .await;
}

/// A cache whose connection goes through a proxy that is then stalled: it keeps the copy
/// it had, and nothing after.
async fn frozen_cache(cluster: &EtcdCluster, prefix: &str) -> (ReadCache, Proxy) {
    let (proxy, client) = common::behind_proxy(&cluster.endpoint(0)).await;
    let cache = ReadCache::watch(client, prefix).await.unwrap();
    proxy.stall();
    (cache, proxy)
}

/// Two accounts under a fresh prefix, `from` and `to`, with a frozen cache that says 100
/// and 0 while etcd says 40 and 0.
async fn accounts_behind_a_frozen_cache(
    cluster: &EtcdCluster,
    client: &Client,
) -> (String, String, ReadCache, Proxy) {
    let prefix = unique("stale");
    let (from, to) = (format!("{prefix}/from"), format!("{prefix}/to"));
    put(client, &from, "100").await;
    put(client, &to, "0").await;
    let (cache, proxy) = frozen_cache(cluster, &prefix).await;
    put(client, &from, "40").await;
    (from, to, cache, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_transfers_conserve_money_at_every_level() {
    const ACCOUNTS: usize = 4;
    const WORKERS: usize = 4;
    const TRANSFERS: usize = 25;
    let cluster = EtcdCluster::start(1).await;
    let setup = cluster.client().await;
    for isolation in [
        Isolation::SerializableSnapshot,
        Isolation::Serializable,
        Isolation::RepeatableReads,
    ] {
        let prefix = unique("cached-bank");
        let account = |i: usize| format!("{prefix}/{i}");
        for i in 0..ACCOUNTS {
            put(&setup, &account(i), "1000").await;
        }
        let mut stms = Vec::new();
        for _ in 0..WORKERS {
            let client = cluster.client().await;
            let cache = ReadCache::watch(client.clone(), prefix.as_str())
                .await
                .unwrap();
            stms.push(Stm::new(client).isolation(isolation).read_cache(cache));
        }
        let accounts: Vec<String> = (0..ACCOUNTS).map(account).collect();
        transfer_concurrently(stms, &accounts, TRANSFERS, secs(60)).await;
        let sum = total(&setup, &accounts).await;
        assert_eq!(sum, 1000 * ACCOUNTS as u64, "{isolation:?}");
    }
}

#[tokio::test]
async fn a_range_too_large_for_one_answer_is_copied_in_parts() {
    // Five values of 1 MiB: read in one answer, they would take 5 MiB, over the client's
    // 4 MiB limit.
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("too-large-range");
    let keys = put_five_mib(&client, &prefix).await;
    let stm = within(secs(10), cached_stm(&client, &prefix)).await;
    let bytes = within(secs(10), stm.run(async |tx| value_bytes(tx, &keys).await))
        .await
        .unwrap();
    assert_eq!(bytes, 5 * MIB);
}

#[tokio::test]
async fn a_range_with_too_many_keys_for_one_listing_is_copied_in_parts() {
    // 400 keys of 12 KiB: even without their values they would take 4.8 MiB in one answer,
    // over the client's 4 MiB limit.
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("long-keys");
    let long = "k".repeat(12 * 1024);
    let keys: Vec<String> = (0..400).map(|i| format!("{prefix}/{i:03}{long}")).collect();
    for some in keys.chunks(100) {
        let puts: Vec<TxnOp> = some
            .iter()
            .map(|key| TxnOp::put(key.as_str(), "1", None))
            .collect();
        client.clone().txn(Txn::new().and_then(puts)).await.unwrap();
    }
    let stm = within(secs(10), cached_stm(&client, &prefix)).await;
    let read = within(
        secs(10),
        stm.run(async |tx| Ok::<_, Error>((tx.get(&keys[0]).await?, tx.get(&keys[399]).await?))),
    )
    .await
    .unwrap();
    assert_eq!(read, (Some(b"1".to_vec()), Some(b"1".to_vec())));
}

#[tokio::test]
async fn a_conflict_over_values_too_large_to_read_back_is_not_read_from_a_frozen_copy_again() {
    // Five values of 1 MiB: a failed commit cannot read them back in one answer (the
    // client takes 4 MiB), so the next attempt must learn some other way that the copy is
    // behind.
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("frozen-large");
    let keys = put_five_mib(&client, &prefix).await;
    let (cache, _proxy) = frozen_cache(&cluster, &prefix).await;
    put(&client, &keys[0], "changed").await;
    let sum = unique("large-sum");
    // With a write, the commit fails; read-only, its check does.
    for (isolation, writes) in [
        (Isolation::SerializableSnapshot, true),
        (Isolation::RepeatableReads, false),
    ] {
        let runs = AtomicU32::new(0);
        let stm = Stm::new(client.clone())
            .isolation(isolation)
            .read_cache(cache.clone())
            .max_attempts(5);
        let bytes = within(
            secs(20),
            stm.run(async |tx| {
                runs.fetch_add(1, Ordering::SeqCst);
                let bytes = value_bytes(tx, &keys).await?;
                if writes {
                    tx.put(sum.as_str(), bytes.to_string());
                }
                Ok::<_, Error>(bytes)
            }),
        )
        .await
        .unwrap();
        assert_eq!(bytes, 4 * MIB + "changed".len(), "{isolation:?}");
        assert_eq!(runs.into_inner(), 2, "{isolation:?}");
    }
}

/// What `Stm` logs at each conflict.
const CONFLICT: &str = "STM conflict; running again";

/// What `Stm` logs when an attempt gives up on a copy that lags behind a change a failed
/// commit or check found.
const COPY_BEHIND: &str = "cache copy behind a change a check found";

// One task thread, so that the log captures every attempt's events.
#[tokio::test]
async fn a_deletion_the_copy_shows_keeps_the_next_attempt_on_the_copy() {
    // Six values of 1 MiB, one deleted per case: the failed commit or check cannot read the
    // four or five left back in one answer, so it learns of the deletion from mod
    // revisions alone; etcd then moves on, while the copy, whose prefix stays quiet, does
    // not.
    let (log, _capture) = common::DebugLog::capture();
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("deleted-large");
    let keys = put_many(&client, &prefix, 6, &vec![b'v'; MIB]).await;
    let cache = ReadCache::watch(client.clone(), prefix.as_str())
        .await
        .unwrap();
    let (elsewhere, sum) = (unique("elsewhere"), unique("deleted-sum"));
    let deleted = AtomicU32::new(0);
    // With a write, the commit fails; read-only, its check does.
    for (isolation, writes) in [
        (Isolation::SerializableSnapshot, true),
        (Isolation::RepeatableReads, false),
    ] {
        let runs = AtomicU32::new(0);
        let stm = Stm::new(client.clone())
            .isolation(isolation)
            .read_cache(cache.clone());
        let bytes = within(
            secs(20),
            stm.run(async |tx| {
                let run = runs.fetch_add(1, Ordering::SeqCst);
                let bytes = value_bytes(tx, &keys).await?;
                if run == 0 {
                    let index = deleted.fetch_add(1, Ordering::SeqCst) as usize;
                    let gone = client.clone().delete(keys[index].as_str(), None).await;
                    caught_up(&cache, gone.unwrap().header().unwrap().revision()).await;
                    put(&client, &elsewhere, "moves etcd on").await;
                }
                if writes {
                    tx.put(sum.as_str(), bytes.to_string());
                }
                Ok::<_, Error>(bytes)
            }),
        )
        .await
        .unwrap();
        let left = 6 - deleted.load(Ordering::SeqCst) as usize;
        assert_eq!(bytes, left * MIB, "{isolation:?}");
        assert_eq!(runs.into_inner(), 2, "{isolation:?}");
    }
    assert!(
        log.lines_with(CONFLICT) >= 2,
        "the capture sees the conflicts"
    );
    assert_eq!(log.lines_with(COPY_BEHIND), 0);
}

/// What `Stm` logs when an attempt after a back-off reads the values the failed commit
/// read from etcd again, the copy not having caught up with them.
const VALUES_BEHIND: &str = "cache copy behind the values a failed commit read";

// One task thread, so that the log captures every attempt's events.
#[tokio::test]
async fn after_a_back_off_a_key_deleted_and_gone_from_the_copy_is_read_from_the_copy() {
    let (log, _capture) = common::DebugLog::capture();
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("deleted-back-off");
    let (a, b) = (format!("{prefix}/a"), format!("{prefix}/b"));
    put(&client, &a, "10").await;
    put(&client, &b, "20").await;
    let cache = ReadCache::watch(client.clone(), prefix.as_str())
        .await
        .unwrap();
    let (elsewhere, seen) = (unique("elsewhere"), unique("seen"));
    let stm = Stm::new(client.clone()).read_cache(cache.clone());
    let runs = AtomicU32::new(0);
    // The first attempt conflicts over the deletion of `b`, the retry with the values its
    // commit read over a put to `a`; each time etcd then moves on while the copy, whose
    // prefix stays quiet, does not. The third attempt comes after a back-off.
    let read = within(
        secs(20),
        stm.run(async |tx| {
            let run = runs.fetch_add(1, Ordering::SeqCst);
            let read = (tx.get(&a).await?, tx.get(&b).await?);
            if run < 2 {
                let changed = if run == 0 {
                    let gone = client.clone().delete(b.as_str(), None).await.unwrap();
                    gone.header().unwrap().revision()
                } else {
                    put(&client, &a, "11").await
                };
                caught_up(&cache, changed).await;
                put(&client, &elsewhere, "moves etcd on").await;
            }
            tx.put(seen.as_str(), format!("{read:?}"));
            Ok::<_, Error>(read)
        }),
    )
    .await
    .unwrap();
    assert_eq!(read, (Some(b"11".to_vec()), None));
    assert_eq!(runs.into_inner(), 3);
    assert!(
        log.lines_with(CONFLICT) >= 2,
        "the capture sees the conflicts"
    );
    assert_eq!(log.lines_with(VALUES_BEHIND), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_follows_puts_and_deletes() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("followed");
    let (kept, gone, later) = (
        format!("{prefix}/kept"),
        format!("{prefix}/gone"),
        format!("{prefix}/later"),
    );
    put(&client, &kept, "1").await;
    put(&client, &gone, "2").await;
    let cache = ReadCache::watch(client.clone(), prefix.as_str())
        .await
        .unwrap();
    assert_eq!(cache.prefix(), prefix.as_bytes());
    put(&client, &later, "3").await;
    let deleted = client.clone().delete(gone.as_str(), None).await.unwrap();
    caught_up(&cache, deleted.header().unwrap().revision()).await;

    // A read-only transaction whose reads all hit a current cache needs one run.
    let runs = AtomicU32::new(0);
    let stm = Stm::new(client.clone()).read_cache(cache.clone());
    let seen = within(
        secs(20),
        stm.run(async |tx| {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>((
                tx.get(&kept).await?,
                tx.get(&gone).await?,
                tx.get(&later).await?,
            ))
        }),
    )
    .await
    .unwrap();
    assert_eq!(seen, (Some(b"1".to_vec()), None, Some(b"3".to_vec())));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_reads_the_writes_of_the_previous_one_from_the_copy() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("own-writes");
    let key = format!("{prefix}/key");
    // Read-committed checks nothing at commit: a read-only run returns what the copy
    // says, so only waiting for the copy to show the write makes it read that write.
    let stm = cached_stm(&client, &prefix)
        .await
        .isolation(Isolation::ReadCommitted);
    for i in 1..=20 {
        let written = i.to_string();
        within(
            secs(20),
            stm.run(async |tx| {
                tx.put(key.as_str(), written.as_str());
                Ok::<_, Error>(())
            }),
        )
        .await
        .unwrap();
        let read = within(secs(5), stm.run(async |tx| tx.get(&key).await)).await;
        assert_eq!(read.unwrap(), Some(written.into_bytes()), "write {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_copy_does_not_make_its_own_blind_writes_conflict() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("quiet");
    let (config, status) = (format!("{prefix}/config"), unique("status"));
    put(&client, &config, "on").await;
    // Nothing changes under the prefix, so the copy's revision stays put while each run
    // writes the key outside it: the next run's snapshot must still be newer than that
    // write, or first-committer-wins sees it as a concurrent one.
    let stm = cached_stm(&client, &prefix).await;
    let runs = AtomicU32::new(0);
    for i in 1..=5 {
        let written = i.to_string();
        within(
            secs(10),
            stm.run(async |tx| {
                runs.fetch_add(1, Ordering::SeqCst);
                if tx.get(&config).await?.as_deref() == Some(b"on".as_slice()) {
                    tx.put(status.as_str(), written.as_str());
                }
                Ok::<_, Error>(())
            }),
        )
        .await
        .unwrap();
    }
    assert_eq!(value(&client, &status).await, Some(b"5".to_vec()));
    assert_eq!(runs.load(Ordering::SeqCst), 5, "one attempt per run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_stay_at_the_copys_revision_when_the_stm_has_seen_newer_ones() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("one-revision");
    let (cached, outside, other) = (
        format!("{prefix}/cached"),
        unique("outside"),
        unique("other"),
    );
    put(&client, &cached, "1").await;
    put(&client, &outside, "1").await;
    let (cache, _proxy) = frozen_cache(&cluster, &prefix).await;
    // Both keys move together, after the copy froze.
    let both = etcd_client::Txn::new().and_then([
        etcd_client::TxnOp::put(cached.as_str(), "2", None),
        etcd_client::TxnOp::put(outside.as_str(), "2", None),
    ]);
    client.clone().txn(both).await.unwrap();
    // A commit of this Stm after that shows it a revision newer than the copy's.
    let stm = Stm::new(client.clone()).read_cache(cache);
    within(
        secs(20),
        stm.run(async |tx| {
            tx.put(other.as_str(), "x");
            Ok::<_, Error>(())
        }),
    )
    .await
    .unwrap();

    let read = within(
        secs(10),
        stm.run(async |tx| {
            let (a, b) = (tx.get(&cached).await?, tx.get(&outside).await?);
            if a != b {
                return Err(Error::InvalidArgument(format!(
                    "read a state that never existed: {a:?} and {b:?}"
                )));
            }
            Ok(a)
        }),
    )
    .await;
    assert_eq!(read.unwrap(), Some(b"2".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_outside_a_quiet_copy_changed_since_its_revision_is_read_from_etcd_after_a_back_off()
{
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("quiet-outside");
    let (config, counter) = (format!("{prefix}/config"), unique("counter"));
    put(&client, &config, "on").await;
    put(&client, &counter, "0").await;
    let stm = cached_stm(&client, &prefix).await;
    // Newer than the copy's revision, which stays put: nothing changes under the prefix.
    put(&client, &counter, "1").await;
    // The first attempt reads the counter at the copy's revision (a conflict); the second
    // reads the values that commit read, and a write of another client's makes it
    // conflict too; the third backs off first, and must not read at the copy's revision
    // again, since the copy does not show the counter's change.
    let runs = AtomicU32::new(0);
    let incremented = within(
        secs(20),
        stm.run(async |tx| {
            let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
            assert_eq!(tx.get(&config).await?, Some(b"on".to_vec()));
            let n = amount(tx.get(&counter).await?);
            if run == 2 {
                put(&client, &counter, &(n + 10).to_string()).await;
            }
            tx.put(counter.as_str(), (n + 1).to_string());
            Ok::<_, Error>(n + 1)
        }),
    )
    .await
    .unwrap();
    assert_eq!(incremented, 12);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// What `Stm` logs when an attempt reads from etcd, without waiting, because the copy has
/// not passed a change outside its prefix that a check found.
const COPY_NOT_PAST: &str = "cache copy not past a change outside its prefix";

// One task thread, so that the log captures every attempt's events.
#[tokio::test]
async fn a_change_outside_a_quiet_copy_found_without_values_is_read_from_etcd_without_waiting() {
    let (log, _capture) = common::DebugLog::capture();
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("quiet-large");
    let config = format!("{prefix}/config");
    put(&client, &config, "on").await;
    let large = put_five_mib(&client, &unique("large")).await;
    let stm = cached_stm(&client, &prefix).await.max_attempts(2);
    put(&client, &large[0], "changed").await;
    // Read-only runs, with no writer meanwhile: the check of each run's first attempt
    // finds a value changed since the copy's revision, without the values, and the next
    // attempt must read them from etcd. The copy's prefix stays quiet, so the copy never
    // passes that change: the attempt must not wait for it to.
    for run in 0..3 {
        let bytes = within(
            secs(30),
            stm.run(async |tx| {
                assert_eq!(tx.get(&config).await?, Some(b"on".to_vec()));
                value_bytes(tx, &large).await
            }),
        )
        .await
        .unwrap();
        assert_eq!(bytes, 4 * MIB + "changed".len(), "run {run}");
    }
    assert_eq!(
        log.lines_with(CONFLICT),
        3,
        "the capture sees the conflicts"
    );
    assert_eq!(log.lines_with(COPY_NOT_PAST), 3);
    assert_eq!(
        log.lines_with(COPY_BEHIND),
        0,
        "an attempt waited for the copy"
    );
}

#[tokio::test]
async fn a_key_only_written_that_changed_since_a_quiet_copy_is_not_checked_against_it_again() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    // Prefetched keys the closure does not read are read back by a failed commit too; they
    // did not fail it, so they must not hide that only the written key did.
    for unread_prefetch in [false, true] {
        let prefix = unique("quiet-blind");
        let (config, status) = (format!("{prefix}/config"), unique("status"));
        put(&client, &config, "on").await;
        let large = put_five_mib(&client, &unique("large")).await;
        let unread = unique("unread");
        put(&client, &unread, "-").await;
        let mut stm = cached_stm(&client, &prefix).await.max_attempts(2);
        if unread_prefetch {
            // With the large keys, the prefetch is too large to answer: nothing is pinned.
            let prefetch = large.iter().cloned().chain([unread]);
            stm = stm.prefetch(prefetch);
        }
        // Newer than the copy's revision, which stays put.
        put(&client, &status, "old").await;
        // The commit writes `status` without reading it, so it requires no change since
        // the copy's revision: it fails, and the values it reads back are too large to
        // answer. Nothing it read changed; the next attempt must not fail on `status` again.
        within(
            secs(30),
            stm.run(async |tx| {
                assert_eq!(tx.get(&config).await?, Some(b"on".to_vec()));
                let bytes = value_bytes(tx, &large).await?;
                tx.put(status.as_str(), bytes.to_string());
                Ok::<_, Error>(())
            }),
        )
        .await
        .unwrap_or_else(|error| panic!("unread prefetch key {unread_prefetch}: {error}"));
        assert_eq!(
            value(&client, &status).await,
            Some((5 * MIB).to_string().into_bytes())
        );
    }
}

#[tokio::test]
async fn a_read_only_check_held_up_in_transit_is_sent_again() {
    let cluster = EtcdCluster::start(1).await;
    let direct = cluster.client().await;
    let proxy = Proxy::start(&cluster.endpoint(0)).await.unwrap();
    let two_ways = two_path_client(&cluster, &proxy).await;
    let prefix = unique("checked");
    let key = format!("{prefix}/a");
    put(&direct, &key, "1").await;
    let cache = ReadCache::watch(direct.clone(), prefix.as_str())
        .await
        .unwrap();
    let stm = Stm::new(two_ways)
        .read_cache(cache)
        .request_timeout(TWO_PATH_REQUEST_TIMEOUT);
    for _ in 0..20 {
        // The read comes from the copy; the check that ends the run is the one request,
        // and goes through the stalled proxy or the direct way.
        proxy.stall();
        let started = Instant::now();
        let read = within(THROUGH_TWO_PATHS, stm.run(async |tx| tx.get(&key).await)).await;
        let held = started.elapsed() >= millis(1_900);
        proxy.heal();
        assert_eq!(read.unwrap(), Some(b"1".to_vec()));
        if held {
            return;
        }
    }
    panic!("no check went through the stalled proxy in 20 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cache_costs_a_conflict_never_a_lost_update() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let (from, to, cache, _proxy) = accounts_behind_a_frozen_cache(&cluster, &client).await;

    let runs = AtomicU32::new(0);
    let stm = Stm::new(client.clone()).read_cache(cache);
    within(
        secs(10),
        stm.run(async |tx| {
            runs.fetch_add(1, Ordering::SeqCst);
            move_a_quarter(tx, &from, &to).await
        }),
    )
    .await
    .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2, "stale values must conflict");
    assert_eq!(value(&client, &from).await, Some(b"30".to_vec()));
    assert_eq!(value(&client, &to).await, Some(b"10".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_pinned_by_a_read_from_etcd_does_not_read_the_copy() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let (from, _to, cache, _proxy) = accounts_behind_a_frozen_cache(&cluster, &client).await;
    let outside = unique("outside-the-copy");
    put(&client, &outside, "x").await;
    for isolation in [Isolation::SerializableSnapshot, Isolation::Serializable] {
        // The first read, of a key outside the prefix, pins the attempt's snapshot to
        // etcd's current revision; the cached key must then be read at that revision too,
        // not from a copy of another one (here, frozen before `from` became 40).
        let seen = std::sync::Mutex::new(Vec::new());
        let stm = Stm::new(client.clone())
            .read_cache(cache.clone())
            .isolation(isolation);
        let balance = within(
            secs(10),
            stm.run(async |tx| {
                tx.get(&outside).await?;
                let balance = amount(tx.get(&from).await?);
                seen.lock().unwrap().push(balance);
                Ok::<_, Error>(balance)
            }),
        )
        .await
        .unwrap();
        assert_eq!(balance, 40, "{isolation:?}");
        assert_eq!(seen.into_inner().unwrap(), [40], "{isolation:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_repeated_conflicts_a_cache_that_fell_behind_is_not_read_again() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let (from, to, cache, _proxy) = accounts_behind_a_frozen_cache(&cluster, &client).await;

    // Run 1 reads the frozen copy and conflicts; run 2 reads what that commit read, but
    // another writer changes `from` first, so it conflicts too. After the back-off the
    // copy is still behind: run 3 must read etcd, not the copy.
    let runs = AtomicU32::new(0);
    let stm = Stm::new(client.clone()).read_cache(cache).max_attempts(6);
    within(
        secs(10),
        stm.run(async |tx| {
            if runs.fetch_add(1, Ordering::SeqCst) == 1 {
                put(&client, &from, "80").await;
            }
            move_a_quarter(tx, &from, &to).await
        }),
    )
    .await
    .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(value(&client, &from).await, Some(b"60".to_vec()));
    assert_eq!(value(&client, &to).await, Some(b"20".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_come_from_the_copy_without_asking_etcd() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("no-round-trip");
    let key = format!("{prefix}/key");
    put(&client, &key, "cached").await;
    let cache = ReadCache::watch(client, prefix.as_str()).await.unwrap();
    // The transactions' own connection forwards nothing: only the copy can answer.
    let (proxy, cut_off) = common::behind_proxy(&cluster.endpoint(0)).await;
    proxy.stall();
    let stm = Stm::new(cut_off)
        .isolation(Isolation::ReadCommitted) // checks nothing at commit
        .read_cache(cache);
    let read = within(secs(5), stm.run(async |tx| tx.get(&key).await)).await;
    assert_eq!(read.unwrap(), Some(b"cached".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_transaction_on_a_stale_cache_returns_the_current_value() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("stale-read");
    let key = format!("{prefix}/key");
    put(&client, &key, "old").await;
    let (cache, _proxy) = frozen_cache(&cluster, &prefix).await;
    put(&client, &key, "new").await;

    for isolation in [Isolation::SerializableSnapshot, Isolation::Serializable] {
        let stm = Stm::new(client.clone())
            .isolation(isolation)
            .read_cache(cache.clone());
        let read = within(secs(10), stm.run(async |tx| tx.get(&key).await)).await;
        assert_eq!(read.unwrap(), Some(b"new".to_vec()), "{isolation:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_behind_a_compaction_is_left_for_the_rest_of_the_run_and_no_conflict_is_counted() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("compacted");
    let (cached, outside) = (format!("{prefix}/cached"), unique("outside"));
    put(&client, &cached, "1").await;
    put(&client, &outside, "a").await;
    let (cache, _proxy) = frozen_cache(&cluster, &prefix).await;
    put(&client, &cached, "2").await;
    let now = put(&client, &outside, "b").await;
    client.clone().compact(now, None).await.unwrap();

    // The first read pins the frozen copy's revision; the second, from etcd, finds it
    // compacted. The next attempt must not pin it again, and that first one is no conflict.
    let stm = Stm::new(client.clone()).read_cache(cache).max_attempts(1);
    let read = within(
        secs(10),
        stm.run(async |tx| Ok::<_, Error>((tx.get(&cached).await?, tx.get(&outside).await?))),
    )
    .await
    .unwrap();
    assert_eq!(read, (Some(b"2".to_vec()), Some(b"b".to_vec())));
}

#[tokio::test]
async fn a_read_only_transaction_may_read_more_cached_keys_than_one_txn_may_compare() {
    const KEYS: usize = 300; // etcd takes at most 128 compares per Txn by default
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("many");
    let keys = put_many(&client, &prefix, KEYS, b"1").await;
    let stm = cached_stm(&client, &prefix).await;
    let sum = within(secs(10), stm.run(async |tx| sum(tx, &keys).await))
        .await
        .unwrap();
    assert_eq!(sum, KEYS as u64);
}

#[tokio::test]
async fn a_change_to_any_of_many_keys_read_is_caught_by_the_read_only_check() {
    const KEYS: usize = 300;
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("many-changed");
    let keys = put_many(&client, &prefix, KEYS, b"1").await;
    let stm = cached_stm(&client, &prefix).await;
    // Each run changes one more key while its first attempt is under way: wherever that
    // key falls among the checks, the attempt must not commit what it read.
    for changed in 0..10 {
        let attempts = AtomicU32::new(0);
        let sum = within(
            secs(10),
            stm.run(async |tx| {
                let sum = sum(tx, &keys).await?;
                if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                    put(&client, &keys[changed * 29], "2").await;
                }
                Ok::<_, Error>(sum)
            }),
        )
        .await
        .unwrap();
        assert_eq!(sum, (KEYS + changed + 1) as u64, "run {changed}");
        assert_eq!(attempts.load(Ordering::SeqCst), 2, "run {changed}");
    }
}

#[tokio::test]
async fn a_change_caught_beyond_the_first_compares_is_not_read_from_a_frozen_copy_again() {
    caught_beyond_the_first_compares(Change::Put).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_caught_beyond_the_first_compares_is_not_read_from_a_frozen_copy_again() {
    // The check reads the deleted key's mod revision as 0, and the copy must still show
    // the deletion (at the revision checked) before the second attempt reads it again.
    caught_beyond_the_first_compares(Change::Delete).await;
}

enum Change {
    Put,
    Delete,
}

/// One of 2,000 keys changes behind a frozen copy. The first attempt reads the copy, and
/// its check finds the change, most likely among the keys it reads after the compares,
/// without their values. The second attempt must then not read the copy again.
async fn caught_beyond_the_first_compares(change: Change) {
    const KEYS: usize = 2_000; // the check compares 128, then reads the rest keys-only
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("many-frozen");
    let keys = put_many(&client, &prefix, KEYS, b"1").await;
    let (cache, _proxy) = frozen_cache(&cluster, &prefix).await;
    let expected = match change {
        Change::Put => {
            put(&client, &keys[7], "2").await;
            KEYS as u64 + 1
        }
        Change::Delete => {
            client.clone().delete(keys[7].as_str(), None).await.unwrap();
            KEYS as u64 - 1
        }
    };
    for isolation in [Isolation::SerializableSnapshot, Isolation::RepeatableReads] {
        let stm = Stm::new(client.clone())
            .isolation(isolation)
            .read_cache(cache.clone())
            .max_attempts(2);
        let sum = within(secs(20), stm.run(async |tx| sum(tx, &keys).await))
            .await
            .unwrap();
        assert_eq!(sum, expected, "{isolation:?}");
    }
}

// One task thread, so that the log captures every run's events.
#[tokio::test]
async fn deleting_an_absent_cached_key_does_not_stall_the_next_reads() {
    const RUNS: usize = 20;
    let (log, _capture) = common::DebugLog::capture();
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("absent");
    let (cached, outside) = (format!("{prefix}/cached"), unique("outside"));
    put(&client, &cached, "1").await;
    let stm = cached_stm(&client, &prefix).await;
    // Each run reads the copy, deletes an absent key under the prefix (no event there)
    // and writes outside it. Waiting for a change the copy never shows would cost each
    // next run 100 ms, and then make it read from etcd.
    for run in 0..RUNS {
        let absent = format!("{prefix}/absent");
        within(
            secs(5),
            stm.run(async |tx| {
                tx.get(&cached).await?;
                tx.delete(absent.as_str());
                tx.put(outside.as_str(), run.to_string());
                Ok::<_, Error>(())
            }),
        )
        .await
        .unwrap();
    }
    assert_eq!(
        log.lines_with("cache copy behind a write made through it"),
        0,
        "a run waited for the copy to show a delete that changed nothing"
    );
    assert_eq!(
        value(&client, &outside).await,
        Some((RUNS - 1).to_string().into_bytes())
    );
    // The capture hears these runs: a conflict made on purpose is logged.
    let conflicted = AtomicBool::new(false);
    let run = stm.run(async |tx| {
        tx.get(&cached).await?;
        if !conflicted.swap(true, Ordering::SeqCst) {
            client.clone().put(cached.as_str(), "2", None).await?;
        }
        tx.put(outside.as_str(), "last");
        Ok::<_, Error>(())
    });
    within(secs(5), run).await.unwrap();
    assert_eq!(log.lines_with("STM conflict"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_the_watch_task() {
    let cluster = common::cluster_off_this_runtime(1).await;
    let client = cluster.client().await;
    let baseline = task_baseline(&client).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let cache = ReadCache::watch(client.clone(), unique("dropped"))
        .await
        .unwrap();
    let stm = Stm::new(client).read_cache(cache.clone());
    assert!(metrics.num_alive_tasks() > baseline, "the cache has a task");
    drop(cache);
    // The task would end within a scheduler turn or two if the drop had stopped it.
    let stopped = tokio::time::timeout(millis(300), tasks_back_to(baseline)).await;
    assert!(
        stopped.is_err(),
        "the Stm holds a handle: the task must live on"
    );
    drop(stm);
    tasks_back_to(baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_whose_runtime_shut_down_is_stopped_and_not_read() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("orphaned");
    let key = format!("{prefix}/n");
    put(&client, &key, "0").await;
    let cache = tokio::task::spawn_blocking({
        let (client, prefix) = (client.clone(), prefix.clone());
        move || {
            let other = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // The watch task goes with this runtime; the copy stays as it was.
            other.block_on(ReadCache::watch(client, prefix)).unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(cache.revision(), 0, "a copy nobody keeps current");
    let stm = Stm::new(client.clone()).read_cache(cache);
    let runs = AtomicU32::new(0);
    for _ in 0..5 {
        let increment = stm.run(async |tx| {
            runs.fetch_add(1, Ordering::Relaxed);
            let n = amount(tx.get(&key).await?);
            tx.put(key.as_str(), (n + 1).to_string());
            Ok::<_, Error>(())
        });
        within(secs(10), increment).await.unwrap();
    }
    // Read from etcd: no attempt read the frozen copy and conflicted.
    assert_eq!(runs.load(Ordering::Relaxed), 5);
    assert_eq!(value(&client, &key).await, Some(b"5".to_vec()));
}

#[tokio::test]
async fn an_empty_prefix_is_refused() {
    let cluster = EtcdCluster::start(1).await;
    let made = ReadCache::watch(cluster.client().await, "").await;
    assert!(matches!(made, Err(Error::InvalidArgument(_))), "{made:?}");
}

#[tokio::test]
async fn an_unreachable_cluster_gives_the_refused_connection_in_bounded_time() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    cluster.kill(0);
    let made = within(secs(7), ReadCache::watch(client, unique("unreachable"))).await;
    assert!(
        matches!(&made, Err(error @ Error::Etcd(_)) if error.is_transient()),
        "{made:?}"
    );
}

#[tokio::test]
async fn a_cluster_that_never_answers_gives_a_timeout() {
    let cluster = EtcdCluster::start(1).await;
    let proxy = Proxy::start(&cluster.endpoint(0)).await.unwrap();
    let client = Client::connect([proxy.endpoint()], None).await.unwrap();
    proxy.stall();
    let made = within(secs(7), ReadCache::watch(client, unique("unanswered"))).await;
    assert!(
        matches!(&made, Err(Error::Timeout { call: "Watch", after }) if *after == secs(5)),
        "{made:?}"
    );
}

/// A transaction that reads keys of the copy and keys outside it, at the repeatable-read
/// level, under steady contention on one of the outside keys: a write to it every 50 ms,
/// over a link whose round trip is at least 20 ms. Without a cache, or with a frozen one,
/// an attempt after a conflict's back-off reads all its keys again in one Txn, and its
/// check follows one round trip later: most such attempts commit. An attempt that went
/// back to a healthy copy read each outside key in a round trip of its own, five before
/// its check, a window no attempt could get through: every attempt conflicted until the
/// run gave up, with the default number of attempts too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_back_off_keys_outside_the_copy_are_not_read_one_round_trip_each() {
    const OUTSIDE: usize = 5;
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("mixed-reads");
    let cached = format!("{prefix}/cached");
    let outside: Vec<String> = (0..OUTSIDE)
        .map(|i| unique(&format!("mixed-{i}")))
        .collect();
    put(&client, &cached, "1").await;
    for key in &outside {
        put(&client, key, "0").await;
    }
    let cache = ReadCache::watch(client.clone(), prefix.as_str())
        .await
        .unwrap();
    let (proxy, slow) = common::behind_proxy(&cluster.endpoint(0)).await;
    proxy.delay(millis(10));
    let writer = tokio::spawn({
        let (client, contended) = (client.clone(), outside[0].clone());
        async move {
            for n in 1.. {
                put(&client, &contended, &n.to_string()).await;
                tokio::time::sleep(millis(50)).await;
            }
        }
    });
    let mut keys = vec![cached.clone()];
    keys.extend(outside.iter().cloned());
    for with_cache in [false, true] {
        let mut stm = Stm::new(slow.clone())
            .isolation(Isolation::RepeatableReads)
            // Measured: 3-12 attempts each way, 12 with another test running beside it.
            .max_attempts(200);
        if with_cache {
            stm = stm.read_cache(cache.clone());
        }
        let runs = AtomicU32::new(0);
        let read = within(
            secs(30),
            stm.run(async |tx| {
                let run = runs.fetch_add(1, Ordering::SeqCst);
                let mut values = Vec::new();
                for key in &keys {
                    values.push(tx.get(key).await?);
                }
                if run == 1 {
                    // The retry with the failed check's values conflicts too: the next
                    // attempts come after a back-off.
                    put(&client, &outside[1], "changed").await;
                }
                Ok::<_, Error>(values)
            }),
        )
        .await;
        let runs = runs.into_inner();
        assert!(
            read.is_ok(),
            "with cache {with_cache}: {read:?} after {runs} attempts"
        );
    }
    writer.abort();
}

/// A copy that does not show a write made through its cache, even after the wait for it
/// (its watch frozen), is not read: the transaction reads etcd, and sees the write, as
/// `ReadCache`'s docs promise ("transactions read the writes made through the cache").
/// Before, the attempt read the copy anyway: at read-committed, which checks nothing, it
/// returned the value from before its own `Stm`'s write; at the other levels, it read a
/// value certain to be stale and conflicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_the_cache_is_read_back_when_the_copy_does_not_show_it() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("own-write-frozen");
    let key = format!("{prefix}/key");
    put(&client, &key, "old").await;
    let (cache, _proxy) = frozen_cache(&cluster, &prefix).await;
    for isolation in [Isolation::ReadCommitted, Isolation::SerializableSnapshot] {
        let stm = Stm::new(client.clone())
            .isolation(isolation)
            .read_cache(cache.clone());
        let written = format!("{isolation:?}");
        within(
            secs(10),
            stm.run(async |tx| {
                tx.put(key.as_str(), written.as_str());
                Ok::<_, Error>(())
            }),
        )
        .await
        .unwrap();
        let runs = AtomicU32::new(0);
        let read = within(
            secs(10),
            stm.run(async |tx| {
                runs.fetch_add(1, Ordering::SeqCst);
                tx.get(&key).await
            }),
        )
        .await
        .unwrap();
        assert_eq!(read, Some(written.into_bytes()), "{isolation:?}");
        assert_eq!(runs.into_inner(), 1, "{isolation:?}: a stale copy was read");
    }
}
