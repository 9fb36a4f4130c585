//! Mutex and MutexGuard against real etcd: exclusion, order, fencing, cancellation,
//! loss, interoperability with etcdctl and etcd's Lock service, and bad input.

mod common;

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{
    Deletion, Etcdctl, Held, THROUGH_TWO_PATHS, a_late_join_leaves_no_key, appears, exists,
    hex_key, keys_under, millis, secs, unique, watch_events_sent, watch_streams_become, within,
};
use etcd_client::{Client, LockOptions, Txn, TxnOp};
use etcd_concurrency::testing::EtcdCluster;
use etcd_concurrency::{Error, Mutex, MutexGuard, Session};

async fn session(client: &Client) -> Session {
    Session::builder(client.clone())
        .ttl(secs(10))
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_sessions_never_hold_at_once_and_tokens_grow_in_grant_order() {
    const WORKERS: usize = 6;
    const ROUNDS: usize = 25;
    let cluster = EtcdCluster::start(1).await;
    let name = unique("exclusion");
    let counter = format!("{name}-counter");
    let held = Arc::new(AtomicBool::new(false));
    let grants = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let client = cluster.client().await; // each worker its own connection
        let session = session(&client).await;
        let (name, counter) = (name.clone(), counter.clone());
        let (held, grants) = (held.clone(), grants.clone());
        workers.push(tokio::spawn(async move {
            let mutex = Mutex::new(&session, &name);
            let mut client = client;
            for _ in 0..ROUNDS {
                let guard = within(secs(10), mutex.lock()).await.unwrap();
                assert!(!held.swap(true, Ordering::SeqCst), "two holders at once");
                grants.lock().unwrap().push(guard.fencing_token());
                // A read-modify-write in etcd, fenced by the lock.
                let value = client.get(counter.as_str(), None).await.unwrap();
                let n: u64 = value.kvs().first().map_or(0, |kv| {
                    std::str::from_utf8(kv.value()).unwrap().parse().unwrap()
                });
                let write = Txn::new()
                    .when([guard.ownership_compare()])
                    .and_then([TxnOp::put(counter.as_str(), (n + 1).to_string(), None)]);
                assert!(client.txn(write).await.unwrap().succeeded());
                held.store(false, Ordering::SeqCst);
                guard.unlock().await.unwrap();
            }
            session.close().await.unwrap();
        }));
    }
    within(secs(60), async {
        for worker in workers {
            worker.await.unwrap();
        }
    })
    .await;
    let grants = grants.lock().unwrap().clone();
    assert_eq!(grants.len(), WORKERS * ROUNDS);
    assert!(
        grants.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens not strictly increasing in grant order: {grants:?}"
    );
    let client = cluster.client().await;
    let total = client.clone().get(counter.as_str(), None).await.unwrap();
    assert_eq!(
        total.kvs()[0].value(),
        (WORKERS * ROUNDS).to_string().as_bytes()
    );
    assert!(keys_under(&client, &format!("{name}/")).await.is_empty());
}

#[tokio::test]
async fn waiters_are_served_in_the_order_they_queued() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("fifo");
    let holder = session(&client).await;
    let guard = within(secs(5), Mutex::new(&holder, &name).lock())
        .await
        .unwrap();
    let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut waiters = Vec::new();
    for i in 0..4 {
        let waiter = session(&client).await;
        let (name, order) = (name.clone(), order_tx.clone());
        let key = hex_key(&name, &waiter);
        waiters.push(tokio::spawn(async move {
            let guard = Mutex::new(&waiter, &name).lock().await.unwrap();
            order.send(i).unwrap();
            guard.unlock().await.unwrap();
        }));
        within(secs(5), appears(&client, &key)).await; // queued before the next one
    }
    guard.unlock().await.unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(within(secs(5), order_rx.recv()).await.unwrap());
    }
    assert_eq!(order, [0, 1, 2, 3]);
    for waiter in waiters {
        within(secs(5), waiter).await.unwrap();
    }
}

/// Every waiter following the whole queue made each release reach every waiter: etcd sent
/// n watch events per hand-off, n² to drain the queue. Only the 128 nearest the head do.
#[tokio::test]
async fn a_long_queue_drains_in_order_and_each_release_reaches_a_bounded_number_of_waiters() {
    const WAITERS: u64 = 500;
    const FOLLOWING_THE_QUEUE: u64 = 128;
    let cluster = EtcdCluster::start(1).await;
    let member = cluster.endpoint(0);
    let client = cluster.client().await;
    let name = unique("long-queue");
    let holder = session(&client).await;
    let guard = within(secs(5), Mutex::new(&holder, &name).lock())
        .await
        .unwrap();
    let (waiters, mut order_rx) = queue_behind(&client, &name, WAITERS).await;
    // A waiter far back watches the key it follows and its own key.
    let far_back = WAITERS - FOLLOWING_THE_QUEUE;
    within(secs(10), watch_streams_become(&member, WAITERS + far_back)).await;
    let sent_before = watch_events_sent(&member).await;
    guard.unlock().await.unwrap();
    let mut order = Vec::new();
    for _ in 0..WAITERS {
        order.push(within(secs(10), order_rx.recv()).await.unwrap());
    }
    assert_eq!(order, (0..WAITERS).collect::<Vec<_>>());
    for waiter in waiters {
        within(secs(5), waiter).await.unwrap();
    }
    let sent = watch_events_sent(&member).await - sent_before;
    // Each release reaches the waiters following the queue, the one following that key
    // alone, and perhaps a few watches that waiters done with the lock still keep.
    let bound = (WAITERS + 1) * (FOLLOWING_THE_QUEUE + 8);
    assert!(sent <= bound, "{sent} watch events for {WAITERS} hand-offs");
}

/// A waiter far back follows one key ahead; when that waiter gives up, it follows another.
#[tokio::test]
async fn a_waiter_far_back_moves_up_past_a_waiter_that_gave_up() {
    const WAITERS: u64 = 140;
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("gave-up");
    let holder = session(&client).await;
    let guard = within(secs(5), Mutex::new(&holder, &name).lock())
        .await
        .unwrap();
    let (waiters, mut order_rx) = queue_behind(&client, &name, WAITERS).await;
    // The last waiter, 140 keys back, follows the key of waiter 10 (129 places ahead of
    // it), then that of waiter 9, which gives up too.
    const GIVING_UP: [u64; 3] = [10, 9, 50];
    for gives_up in GIVING_UP {
        waiters[gives_up as usize].abort();
    }
    let queue_left = WAITERS as usize + 1 - GIVING_UP.len();
    let given_up = common::keys_under_become(&client, &name, |keys| keys == queue_left);
    within(secs(5), given_up).await;
    guard.unlock().await.unwrap();
    let mut order = Vec::new();
    for _ in 0..WAITERS - 3 {
        order.push(within(secs(10), order_rx.recv()).await.unwrap());
    }
    let expected: Vec<u64> = (0..WAITERS).filter(|i| !GIVING_UP.contains(i)).collect();
    assert_eq!(order, expected);
    for (index, waiter) in waiters.into_iter().enumerate() {
        let ended = within(secs(5), waiter).await;
        if GIVING_UP.contains(&(index as u64)) {
            assert!(ended.unwrap_err().is_cancelled());
        } else {
            ended.unwrap();
        }
    }
}

/// A waiter far back (more than 128 keys ahead) watched only the key it followed, so the
/// deletion of its own key went unseen until 129 hand-offs later: deleted by hand, it
/// waited on; with its lease revoked, until the next keep-alive (20 s on a 60 s lease).
#[tokio::test]
async fn a_waiter_far_back_learns_at_once_that_its_key_or_lease_is_gone() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("far-back-gone");
    let others = client.clone().lease_grant(60, None).await.unwrap().id();
    for i in 0..140 {
        let on_lease = etcd_client::PutOptions::new().with_lease(others);
        let key = format!("{name}/{:x}", 0x1000 + i);
        client.clone().put(key, "", Some(on_lease)).await.unwrap();
    }
    for revoke in [false, true] {
        let ours = Session::builder(client.clone())
            .ttl(secs(60))
            .build()
            .await
            .unwrap();
        let mutex = Mutex::new(&ours, &name);
        let mut waiter = tokio::spawn(async move { mutex.lock().await.map(drop) });
        let key = hex_key(&name, &ours);
        within(secs(5), appears(&client, &key)).await;
        assert!(
            tokio::time::timeout(millis(300), &mut waiter)
                .await
                .is_err()
        );
        if revoke {
            client.clone().lease_revoke(ours.lease_id()).await.unwrap();
        } else {
            client.clone().delete(key, None).await.unwrap();
        }
        let result = within(secs(5), waiter).await.unwrap();
        match revoke {
            true => assert!(matches!(result, Err(Error::SessionLost)), "{result:?}"),
            false => assert!(matches!(result, Err(Error::OwnershipLost)), "{result:?}"),
        }
    }
    client.clone().lease_revoke(others).await.unwrap();
}

/// Queues `count` sessions on lock `name`, one after another; each takes the lock, sends
/// its number, and unlocks.
async fn queue_behind(
    client: &Client,
    name: &str,
    count: u64,
) -> (
    Vec<tokio::task::JoinHandle<()>>,
    tokio::sync::mpsc::UnboundedReceiver<u64>,
) {
    let (order_tx, order_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut waiters = Vec::new();
    for i in 0..count {
        let waiter = session(client).await;
        let (name, order) = (name.to_owned(), order_tx.clone());
        let key = hex_key(&name, &waiter);
        waiters.push(tokio::spawn(async move {
            let guard = Mutex::new(&waiter, &name).lock().await.unwrap();
            order.send(i).unwrap();
            guard.unlock().await.unwrap();
        }));
        within(secs(5), appears(client, &key)).await; // queued before the next one
    }
    (waiters, order_rx)
}

#[tokio::test]
async fn try_lock_gives_none_while_held_leaves_no_key_and_some_after_release() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("try");
    let (holder, other) = (session(&client).await, session(&client).await);
    let guard = Mutex::new(&holder, &name)
        .try_lock()
        .await
        .unwrap()
        .expect("free");
    let contender = Mutex::new(&other, &name);
    assert!(
        within(secs(5), contender.try_lock())
            .await
            .unwrap()
            .is_none()
    );
    let keys = keys_under(&client, &format!("{name}/")).await;
    assert_eq!(keys, [String::from_utf8(guard.key().to_vec()).unwrap()]);
    // Another guard of the same session is "held" too.
    let same_session = Mutex::new(&holder, &name);
    assert!(
        within(secs(5), same_session.try_lock())
            .await
            .unwrap()
            .is_none()
    );
    guard.unlock().await.unwrap();
    let taken = contender
        .try_lock()
        .await
        .unwrap()
        .expect("free after release");
    assert_eq!(taken.key(), hex_key(&name, &other));
}

#[tokio::test]
async fn a_cancelled_lock_leaves_no_key() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("cancel");
    let (holder, waiter) = (session(&client).await, session(&client).await);
    let guard = within(secs(10), Mutex::new(&holder, &name).lock())
        .await
        .unwrap();
    let mutex = Mutex::new(&waiter, &name);
    let waiting_key = hex_key(&name, &waiter);
    let attempt = tokio::spawn(async move { mutex.lock().await.map(drop) });
    within(secs(5), appears(&client, &waiting_key)).await;
    let deletion = Deletion::of(&client, std::str::from_utf8(&waiting_key).unwrap()).await;
    attempt.abort(); // the waiting future is dropped
    within(secs(5), deletion.happened()).await;
    assert!(exists(&client, guard.key()).await);

    // A deadline through tokio::time::timeout behaves the same.
    let waiting = std::str::from_utf8(&waiting_key).unwrap();
    let deletion = Deletion::after_creation_of(&client, waiting).await;
    let timed_out = tokio::time::timeout(secs(1), Mutex::new(&waiter, &name).lock()).await;
    assert!(timed_out.is_err());
    within(secs(5), deletion.happened()).await;
    guard.unlock().await.unwrap();
    let next = within(secs(5), Mutex::new(&waiter, &name).lock())
        .await
        .unwrap();
    assert_eq!(keys_under(&client, &format!("{name}/")).await.len(), 1);
    next.unlock().await.unwrap();
}

#[tokio::test]
async fn a_guard_dropped_in_an_aborted_task_is_released_in_the_background() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("abort");
    let holder = session(&client).await;
    let (key_tx, key_rx) = tokio::sync::oneshot::channel();
    let mutex = Mutex::new(&holder, &name);
    let task = tokio::spawn(async move {
        let guard = within(secs(10), mutex.lock()).await.unwrap();
        key_tx.send(guard.key().to_vec()).unwrap();
        std::future::pending::<()>().await;
    });
    let key = String::from_utf8(within(secs(5), key_rx).await.unwrap()).unwrap();
    let deletion = Deletion::of(&client, &key).await;
    task.abort();
    // Released, not left to the lease (10 s TTL).
    within(secs(5), deletion.happened()).await;
    let again = within(secs(5), Mutex::new(&holder, &name).lock()).await;
    again.unwrap().unlock().await.unwrap();
}

/// A guard of lock `name` whose key was deleted behind its back, and a newer one on the
/// same lease: the same key, a new incarnation. Also the stale guard's session, which
/// revokes that lease when dropped.
async fn stale_and_newer(client: &mut Client, name: &str) -> (Session, MutexGuard, MutexGuard) {
    let first = session(client).await;
    let stale = within(secs(10), Mutex::new(&first, name).lock())
        .await
        .unwrap();
    client.delete(stale.key(), None).await.unwrap(); // released behind its back
    within(secs(2), stale.lost()).await;
    let resumed = Session::builder(client.clone())
        .lease(first.lease_id())
        .build()
        .await
        .unwrap();
    let newer = within(secs(5), Mutex::new(&resumed, name).lock())
        .await
        .unwrap();
    assert_eq!(newer.key(), stale.key());
    (first, stale, newer)
}

#[tokio::test]
async fn a_stale_unlock_does_not_delete_a_newer_holder() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let (_first, stale, newer) = stale_and_newer(&mut client, &unique("stale")).await;
    assert!(newer.fencing_token() > stale.fencing_token());
    let unlocked = within(secs(5), stale.unlock()).await;
    assert!(
        matches!(unlocked, Err(Error::OwnershipLost)),
        "{unlocked:?}"
    );
    let current = client.get(newer.key(), None).await.unwrap();
    assert_eq!(current.kvs()[0].create_revision(), newer.fencing_token());
    newer.unlock().await.unwrap();
}

#[tokio::test]
async fn a_waiter_whose_lease_is_revoked_gets_session_lost() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let name = unique("revoked-waiter");
    let (holder, waiter) = (session(&client).await, session(&client).await);
    let guard = within(secs(10), Mutex::new(&holder, &name).lock())
        .await
        .unwrap();
    let mutex = Mutex::new(&waiter, &name);
    let attempt = tokio::spawn(async move { mutex.lock().await });
    within(secs(5), appears(&client, &hex_key(&name, &waiter))).await;
    client.lease_revoke(waiter.lease_id()).await.unwrap();
    let result = within(secs(5), attempt).await.unwrap();
    assert!(matches!(result, Err(Error::SessionLost)), "{result:?}");
    assert!(waiter.is_lost());
    assert_eq!(keys_under(&client, &format!("{name}/")).await.len(), 1);
    guard.unlock().await.unwrap();
}

#[tokio::test]
async fn a_waiter_whose_key_is_deleted_gets_ownership_lost_even_on_a_one_second_lease() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let name = unique("deleted-waiter");
    let holder = session(&client).await;
    // Under a second is always left on a 1 s lease, which etcd reports as TTL 0.
    let waiter = Session::builder(client.clone())
        .ttl(secs(1))
        .build()
        .await
        .unwrap();
    assert_eq!(waiter.ttl(), secs(1), "the test cluster grants 1 s leases");
    let guard = within(secs(10), Mutex::new(&holder, &name).lock())
        .await
        .unwrap();
    let mutex = Mutex::new(&waiter, &name);
    let attempt = tokio::spawn({
        let mutex = mutex.clone();
        async move { mutex.lock().await.map(drop) }
    });
    let waiter_key = hex_key(&name, &waiter);
    within(secs(5), appears(&client, &waiter_key)).await;
    client.delete(waiter_key, None).await.unwrap();
    let result = within(secs(5), attempt).await.unwrap();
    assert!(matches!(result, Err(Error::OwnershipLost)), "{result:?}");
    assert!(!waiter.is_lost(), "a live lease was taken for a lost one");
    guard.unlock().await.unwrap();
    let again = within(secs(5), mutex.lock()).await.unwrap();
    again.unlock().await.unwrap();
}

#[tokio::test]
async fn a_holder_whose_lease_is_revoked_sees_lost() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let name = unique("revoked-holder");
    let holder = session(&client).await;
    let guard = within(secs(10), Mutex::new(&holder, &name).lock())
        .await
        .unwrap();
    let still_held = tokio::time::timeout(millis(200), guard.lost()).await;
    assert!(
        still_held.is_err(),
        "lost() resolved while the lock is held"
    );
    client.lease_revoke(holder.lease_id()).await.unwrap();
    within(secs(5), guard.lost()).await;
    let unlocked = within(secs(5), guard.unlock()).await;
    assert!(
        matches!(unlocked, Err(Error::OwnershipLost)),
        "{unlocked:?}"
    );
}

#[tokio::test]
async fn is_lost_turns_true_once_lost_saw_the_key_deleted_or_the_session_closed() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let name = unique("is-lost");
    let holder = session(&client).await;
    let deleted = within(secs(10), Mutex::new(&holder, format!("{name}-a")).lock())
        .await
        .unwrap();
    let closed = within(secs(10), Mutex::new(&holder, format!("{name}-b")).lock())
        .await
        .unwrap();
    assert!(
        !deleted.is_lost() && !closed.is_lost(),
        "both locks are held"
    );
    client.delete(deleted.key(), None).await.unwrap();
    within(secs(5), deleted.lost()).await;
    assert!(deleted.is_lost(), "lost() saw the key deleted");
    assert!(!closed.is_lost(), "the other lock is still held");
    within(secs(5), holder.clone().close()).await.unwrap();
    assert!(closed.is_lost(), "the session is closed");
}

/// Once `lost()` has seen the key gone, unlock knows the answer: it must not wait on etcd.
#[tokio::test]
async fn unlock_after_lost_saw_the_key_deleted_answers_at_once_with_etcd_unreachable() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let holder = common::session_with(client.clone(), secs(60), secs(60)).await;
    let mutex = Mutex::new(&holder, unique("deleted-then-cut"));
    let guard = within(secs(10), mutex.lock()).await.unwrap();
    client.delete(guard.key(), None).await.unwrap();
    within(secs(5), guard.lost()).await;
    cluster.pause(0);
    let unlocked = tokio::time::timeout(secs(5), guard.unlock()).await;
    cluster.resume(0);
    let unlocked = unlocked.expect("unlock waited on etcd for a key it had seen gone");
    assert!(
        matches!(unlocked, Err(Error::OwnershipLost)),
        "{unlocked:?}"
    );
}

#[tokio::test]
async fn while_held_stops_the_work_when_the_lock_is_lost_and_never_starts_it_after() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let holder = session(&client).await;
    let guard = within(secs(10), Mutex::new(&holder, unique("held-work")).lock())
        .await
        .unwrap();
    assert_eq!(guard.while_held(async { 42 }).await, Some(42));
    // Revoked once the work runs: it is stopped while running.
    let (running, started) = tokio::sync::oneshot::channel();
    let work = guard.while_held(async {
        running.send(()).unwrap();
        std::future::pending::<()>().await
    });
    let revoke = async {
        started.await.unwrap();
        client.lease_revoke(holder.lease_id()).await.unwrap();
    };
    let (stopped, ()) = within(secs(2), futures::future::join(work, revoke)).await;
    assert_eq!(stopped, None);
    let mut started = 0;
    for _ in 0..20 {
        let work = async {
            started += 1;
        };
        assert_eq!(within(secs(5), guard.while_held(work)).await, None);
    }
    assert_eq!(started, 0, "work started after the lock was lost");
}

#[tokio::test]
async fn holder_names_the_guard_not_a_waiter_and_none_once_free() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let (first, second) = (session(&client).await, session(&client).await);
    let name = unique("holder");
    let onlooker = Mutex::new(&second, &name);
    assert_eq!(within(secs(5), onlooker.holder()).await.unwrap(), None);
    let guard = within(secs(10), Mutex::new(&first, &name).lock())
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let mutex = onlooker.clone();
        async move { mutex.lock().await }
    });
    let waiter_key = format!("{name}/{:x}", second.lease_id());
    within(secs(5), appears(&client, waiter_key.as_bytes())).await;
    let holder = within(secs(5), onlooker.holder()).await.unwrap().unwrap();
    assert_eq!(holder.key(), guard.key());
    assert_eq!(holder.create_revision(), guard.fencing_token());
    assert_eq!(holder.lease_id(), first.lease_id());
    guard.unlock().await.unwrap();
    let next = within(secs(5), waiting).await.unwrap().unwrap();
    let holder = within(secs(5), onlooker.holder()).await.unwrap().unwrap();
    assert_eq!(holder.lease_id(), second.lease_id());
    next.unlock().await.unwrap();
    // It only reads, so a closed session may still ask.
    within(secs(5), second.close()).await.unwrap();
    assert_eq!(within(secs(5), onlooker.holder()).await.unwrap(), None);
    let nameless = Mutex::new(&first, "").holder().await;
    assert!(
        matches!(nameless, Err(Error::InvalidArgument(_))),
        "{nameless:?}"
    );
}

#[tokio::test]
async fn two_locks_through_one_session_are_serialised() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("same-session");
    let shared = session(&client).await;
    let first = within(secs(10), Mutex::new(&shared, &name).lock())
        .await
        .unwrap();
    let second = Mutex::new(&shared, &name);
    let waiting = tokio::time::timeout(millis(300), second.lock()).await;
    assert!(
        waiting.is_err(),
        "the second lock() must wait for the first guard"
    );
    let handle = tokio::spawn(async move { second.lock().await });
    first.unlock().await.unwrap();
    let guard = within(secs(5), handle).await.unwrap().unwrap();
    assert!(exists(&client, guard.key()).await);
    guard.unlock().await.unwrap();
}

#[tokio::test]
async fn etcdctl_lock_and_our_mutex_exclude_each_other() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("etcdctl");
    let ours = session(&client).await;
    let mutex = Mutex::new(&ours, &name);

    let mut etcdctl = Etcdctl::spawn(&cluster.endpoints(), &["lock", &name]);
    let their_key = within(secs(10), etcdctl.next_line())
        .await
        .expect("etcdctl holds");
    assert!(their_key.starts_with(&format!("{name}/")), "{their_key}");
    assert!(within(secs(5), mutex.try_lock()).await.unwrap().is_none());
    let ours_waits = tokio::spawn({
        let mutex = mutex.clone();
        async move { mutex.lock().await }
    });
    tokio::time::sleep(millis(300)).await;
    assert!(
        !ours_waits.is_finished(),
        "lock() must wait while etcdctl holds"
    );
    etcdctl.interrupt().await;
    let guard = within(secs(5), ours_waits).await.unwrap().unwrap();

    let mut etcdctl = Etcdctl::spawn(&cluster.endpoints(), &["lock", &name]);
    let waits = tokio::time::timeout(millis(500), etcdctl.next_line()).await;
    assert!(waits.is_err(), "etcdctl must wait while we hold the lock");
    guard.unlock().await.unwrap();
    let line = within(secs(5), etcdctl.next_line())
        .await
        .expect("etcdctl holds");
    assert!(line.starts_with(&format!("{name}/")));
    etcdctl.interrupt().await;
}

#[tokio::test]
async fn etcd_server_side_lock_and_our_mutex_exclude_each_other() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let name = unique("lock-service");
    let theirs = session(&client).await; // a kept-alive lease for the server-side lock
    let with_lease = || Some(LockOptions::new().with_lease(theirs.lease_id()));
    let held = client.lock(name.as_str(), with_lease()).await.unwrap();
    let ours = session(&client).await;
    let mutex = Mutex::new(&ours, &name);
    assert!(within(secs(5), mutex.try_lock()).await.unwrap().is_none());
    assert!(
        tokio::time::timeout(millis(300), mutex.lock())
            .await
            .is_err()
    );
    client.unlock(held.key()).await.unwrap();
    let guard = within(secs(5), mutex.lock()).await.unwrap();

    let mut their_client = client.clone();
    let name_for_them = name.clone();
    let lease = theirs.lease_id();
    let theirs_waits = tokio::spawn(async move {
        let options = LockOptions::new().with_lease(lease);
        their_client
            .lock(name_for_them.as_str(), Some(options))
            .await
    });
    tokio::time::sleep(millis(300)).await;
    assert!(
        !theirs_waits.is_finished(),
        "the Lock service must wait while we hold"
    );
    guard.unlock().await.unwrap();
    let theirs_held = within(secs(5), theirs_waits).await.unwrap().unwrap();
    client.unlock(theirs_held.key()).await.unwrap();
}

#[tokio::test]
async fn a_lease_with_a_negative_id_names_the_key_as_go_does() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("negative-lease");
    // Go writes an int64 with `%x`: "-1f4".
    let resumed = common::session_on_lease(&client, -500).await;
    let guard = within(secs(10), Mutex::new(&resumed, &name).lock())
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(guard.key()), format!("{name}/-1f4"));
    assert_eq!(
        keys_under(&client, &format!("{name}/")).await,
        [format!("{name}/-1f4")]
    );
    guard.unlock().await.unwrap();
    resumed.close().await.unwrap();
}

#[tokio::test]
async fn bad_names_and_stray_keys() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let ours = session(&client).await;
    let empty = Mutex::new(&ours, "");
    let locked = within(secs(5), empty.lock()).await;
    assert!(matches!(locked, Err(Error::InvalidArgument(_))));
    assert!(matches!(
        empty.try_lock().await,
        Err(Error::InvalidArgument(_))
    ));

    // `a` is a prefix of `ab`, but the locks are independent (etcd #6278).
    let name = unique("prefix");
    let short = within(secs(10), Mutex::new(&ours, &name).lock())
        .await
        .unwrap();
    let other = session(&client).await;
    let long = within(secs(2), Mutex::new(&other, format!("{name}b")).lock()).await;
    long.unwrap().unlock().await.unwrap();
    short.unlock().await.unwrap();

    // A key without a lease under the prefix (etcd #6631) holds the lock until deleted.
    let name = unique("stray");
    let stray = format!("{name}/stray");
    client.put(stray.as_str(), "", None).await.unwrap();
    let mutex = Mutex::new(&ours, &name);
    assert!(within(secs(5), mutex.try_lock()).await.unwrap().is_none());
    let waiting = tokio::spawn({
        let mutex = mutex.clone();
        async move { mutex.lock().await }
    });
    tokio::time::sleep(millis(300)).await;
    assert!(!waiting.is_finished());
    client.delete(stray.as_str(), None).await.unwrap();
    within(secs(2), waiting)
        .await
        .unwrap()
        .unwrap()
        .unlock()
        .await
        .unwrap();
    assert!(keys_under(&client, &format!("{name}/")).await.is_empty());
}

#[tokio::test]
async fn a_lock_queued_behind_a_guard_of_its_own_session_gets_session_lost() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let ours = session(&client).await;
    let mutex = Mutex::new(&ours, unique("lost-behind-own-guard"));
    let guard = within(secs(10), mutex.lock()).await.unwrap();
    let second = tokio::spawn({
        let mutex = mutex.clone();
        async move { mutex.lock().await }
    });
    client.lease_revoke(ours.lease_id()).await.unwrap();
    // The guard is still held: the second call must not wait for it. The session hears
    // of the revoke at its next keep-alive, within a third of the TTL.
    let result = within(secs(10), second).await.unwrap();
    assert!(matches!(result, Err(Error::SessionLost)), "{result:?}");
    drop(guard);
}

#[tokio::test]
async fn a_lock_refused_for_a_revoked_lease_marks_the_session_lost_at_once() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    for try_only in [false, true] {
        // A long TTL: the keep-alive hears of the revoke only 20 s later.
        let ours = Session::builder(client.clone())
            .ttl(secs(60))
            .build()
            .await
            .unwrap();
        let name = unique("revoked-before-lock");
        client.lease_revoke(ours.lease_id()).await.unwrap();
        let mutex = Mutex::new(&ours, &name);
        let result = if try_only {
            within(secs(5), mutex.try_lock()).await.map(drop)
        } else {
            within(secs(5), mutex.lock()).await.map(drop)
        };
        assert!(matches!(result, Err(Error::SessionLost)), "{result:?}");
        assert!(ours.is_lost(), "etcd refused the key for the lease");
        within(millis(100), ours.lost()).await;
        assert!(keys_under(&client, &format!("{name}/")).await.is_empty());
    }
}

#[tokio::test]
async fn try_lock_on_a_resumed_lease_whose_key_waits_behind_the_holder_gives_none() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("resumed-waiter");
    let holder = session(&client).await;
    let guard = within(secs(10), Mutex::new(&holder, &name).lock())
        .await
        .unwrap();
    // An earlier process queued behind the holder, then handed its lease over.
    let earlier = Session::builder(client.clone())
        .ttl(secs(30))
        .build()
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let mutex = Mutex::new(&earlier, &name);
        async move { mutex.lock().await.map(drop) }
    });
    let leftover = hex_key(&name, &earlier);
    within(secs(5), appears(&client, &leftover)).await;
    let lease = earlier.lease_id();
    earlier.orphan();
    // Waiting follows the session, not only its key, which lives on with the lease (30 s).
    let result = within(secs(5), waiting).await.unwrap();
    assert!(matches!(result, Err(Error::SessionLost)), "{result:?}");
    assert!(
        exists(&client, leftover.as_slice()).await,
        "an orphan's key stays"
    );

    let resumed = Session::builder(client.clone())
        .lease(lease)
        .build()
        .await
        .unwrap();
    let tried = within(secs(5), Mutex::new(&resumed, &name).try_lock()).await;
    assert!(
        matches!(&tried, Ok(None)),
        "the holder still holds: {:?}",
        tried.map(|guard| guard.map(|guard| guard.fencing_token()))
    );
    assert_eq!(
        keys_under(&client, &format!("{name}/")).await,
        [String::from_utf8(guard.key().to_vec()).unwrap()],
        "the leftover key is withdrawn, the holder's kept"
    );
    guard.unlock().await.unwrap();
    resumed.close().await.unwrap();
}

#[tokio::test]
async fn an_unlock_that_fails_in_an_outage_goes_on_in_the_background() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let (proxy, cut_off) = common::behind_proxy(&cluster.endpoint(0)).await;
    let holder = common::session_with(cut_off, secs(30), secs(1)).await;
    let guard = within(
        secs(10),
        Mutex::new(&holder, unique("unlock-in-outage")).lock(),
    )
    .await
    .unwrap();
    let key = String::from_utf8(guard.key().to_vec()).unwrap();
    let deletion = Deletion::of(&client, &key).await;
    proxy.cut();
    let unlocked = within(secs(5), guard.unlock()).await;
    assert!(
        matches!(&unlocked, Err(error) if error.is_transient()),
        "{unlocked:?}"
    );
    assert!(exists(&client, key.as_str()).await, "nothing reached etcd");
    // As documented: releasing goes on in the background while the session lives.
    proxy.heal();
    within(secs(10), deletion.happened()).await;
    assert!(!holder.is_lost());
}

#[tokio::test]
async fn a_waiter_whose_key_is_deleted_while_its_watch_is_broken_gets_ownership_lost() {
    let cluster = EtcdCluster::start(1).await;
    let member = cluster.endpoint(0);
    let client = cluster.client().await;
    let name = unique("deleted-while-cut-off");
    let holder = session(&client).await;
    let guard = within(secs(10), Mutex::new(&holder, &name).lock())
        .await
        .unwrap();
    let (proxy, cut_off) = common::behind_proxy(&member).await;
    let waiter = Session::builder(cut_off)
        .ttl(secs(10))
        .build()
        .await
        .unwrap();
    let before = common::watch_streams(&member).await;
    let attempt = tokio::spawn({
        let mutex = Mutex::new(&waiter, &name);
        async move { mutex.lock().await.map(drop) }
    });
    let waiter_key = hex_key(&name, &waiter);
    // The waiter's watch, counted before `appears` opens a watch stream of its own.
    within(secs(5), watch_streams_become(&member, before + 1)).await;
    within(secs(5), appears(&client, &waiter_key)).await;
    // The waiter's watch breaks; while it is down, its key is deleted and the holder
    // leaves: the queue it reads again on re-opening has nobody ahead, nor its own key.
    proxy.cut();
    within(secs(5), watch_streams_become(&member, before)).await;
    client.clone().delete(waiter_key, None).await.unwrap();
    guard.unlock().await.unwrap();
    proxy.heal();
    let result = within(secs(10), attempt).await.unwrap();
    assert!(matches!(result, Err(Error::OwnershipLost)), "{result:?}");
    assert!(keys_under(&client, &format!("{name}/")).await.is_empty());
}

// One task thread, so that the log captures the waiter's events.
#[tokio::test]
async fn a_waiter_whose_key_vanished_while_it_cannot_ask_why_gets_session_lost_once_lost() {
    let (log, _capture) = common::DebugLog::capture();
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("vanished-then-stalled");
    let holder = session(&client).await;
    let guard = within(secs(10), Mutex::new(&holder, &name).lock())
        .await
        .unwrap();
    let (proxy, slow) = common::behind_proxy(&cluster.endpoint(0)).await;
    // Requests retried for as long as it takes: only the session's loss can end the wait.
    let waiter = common::session_with(slow, secs(5), Duration::MAX).await;
    let attempt = tokio::spawn({
        let mutex = Mutex::new(&waiter, &name);
        async move { mutex.lock().await.map(drop) }
    });
    let waiter_key = hex_key(&name, &waiter);
    within(secs(5), appears(&client, &waiter_key)).await;
    // The deletion reaches the waiter half a second late, and so its question whether
    // its lease lives would reach etcd: stalled before then, it gets no answer.
    proxy.delay(millis(500));
    client.clone().delete(waiter_key, None).await.unwrap();
    let asking = "a waiting key vanished; asking etcd whether the lease lives";
    within(secs(5), async {
        while log.lines_with(asking) == 0 {
            tokio::time::sleep(millis(5)).await;
        }
    })
    .await;
    proxy.stall();
    let result = within(secs(15), attempt).await.unwrap();
    assert!(matches!(result, Err(Error::SessionLost)), "{result:?}");
    assert!(waiter.is_lost());
    proxy.heal();
    guard.unlock().await.unwrap();
}

#[tokio::test]
async fn a_lost_session_cannot_lock() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let ours = session(&client).await;
    let mutex = Mutex::new(&ours, unique("lost"));
    ours.clone().close().await.unwrap();
    let locked = within(secs(10), mutex.lock()).await;
    assert!(matches!(locked, Err(Error::SessionLost)), "{locked:?}");
    let tried = within(secs(5), mutex.try_lock()).await;
    assert!(matches!(tried, Err(Error::SessionLost)), "{tried:?}");
}

#[tokio::test]
async fn a_dropped_unlock_still_releases() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("dropped-unlock");
    let holder = session(&client).await;
    let guard = within(secs(10), Mutex::new(&holder, &name).lock())
        .await
        .unwrap();
    let key = String::from_utf8(guard.key().to_vec()).unwrap();
    let deletion = Deletion::of(&client, &key).await;
    // Polled once (no answer can have come) and dropped: the release goes on in the
    // background.
    let cut_short = futures::FutureExt::now_or_never(guard.unlock());
    assert!(cut_short.is_none());
    within(secs(5), deletion.happened()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_mutexes_do_not_let_queue_events_pile_up_in_the_connection() {
    const LOCKS: usize = 3;
    const CYCLES: usize = 1000;
    let cluster = EtcdCluster::start(1).await;
    let shared = cluster.client().await; // the application's one connection
    let others = cluster.client().await;
    let (ours, busy) = (session(&shared).await, session(&others).await);
    // Unread watch messages hold HTTP/2 flow-control windows (measured: three unread
    // watches froze a connection after 6 MB). Two-kilobyte names make that quick.
    let base = unique("idle");
    let names: Vec<String> = (0..LOCKS)
        .map(|i| format!("{base}-{i}-{}", "x".repeat(2048)))
        .collect();
    let mut idle = Vec::new();
    for name in &names {
        // One contended lock() each keeps that queue's watch open for the next one.
        let held = within(secs(10), Mutex::new(&busy, name).lock())
            .await
            .unwrap();
        let mutex = Mutex::new(&ours, name);
        let waiting = tokio::spawn({
            let mutex = mutex.clone();
            async move { mutex.lock().await.unwrap().unlock().await }
        });
        within(secs(5), appears(&others, &hex_key(name, &ours))).await;
        held.unlock().await.unwrap();
        within(secs(5), waiting).await.unwrap().unwrap();
        idle.push(mutex);
    }

    // The application's own watch, on the same connection.
    let probe = format!("{base}-probe");
    let mut watch = shared.clone().watch(probe.as_str(), None).await.unwrap();
    // Others use every lock while ours sit idle: 1 000 deletions (2 MB) reach each idle
    // queue's watch, which carries no puts.
    within(secs(120), async {
        for _ in 0..CYCLES {
            for name in &names {
                Mutex::new(&busy, name)
                    .lock()
                    .await
                    .unwrap()
                    .unlock()
                    .await
                    .unwrap();
            }
        }
    })
    .await;
    others
        .clone()
        .put(probe.as_str(), "still connected?", None)
        .await
        .unwrap();
    let answer = within(secs(5), async {
        loop {
            let answer = watch.message().await.expect("the connection was closed");
            if let Some(answer) = answer.filter(|a| !a.events().is_empty()) {
                return answer;
            }
        }
    })
    .await;
    assert_eq!(
        answer.events()[0].kv().unwrap().value(),
        b"still connected?"
    );
    for mutex in &idle {
        within(secs(5), mutex.lock())
            .await
            .unwrap()
            .unlock()
            .await
            .unwrap();
    }
}

/// A handle on lock `name` of `ours` that has waited for it behind `theirs`, taken it and
/// unlocked it, and so keeps its queue watch open between calls; `observer` reads etcd.
async fn after_a_wait(ours: &Session, theirs: &Session, observer: &Client, name: &str) -> Mutex {
    let held = within(secs(10), Mutex::new(theirs, name).lock())
        .await
        .unwrap();
    let mutex = Mutex::new(ours, name);
    let waiting = tokio::spawn({
        let mutex = mutex.clone();
        async move { mutex.lock().await }
    });
    let key = format!("{name}/{:x}", ours.lease_id());
    within(secs(5), appears(observer, key.as_bytes())).await;
    held.unlock().await.unwrap();
    let guard = within(secs(5), waiting).await.unwrap().unwrap();
    guard.unlock().await.unwrap();
    mutex
}

#[tokio::test]
async fn a_kept_queue_watch_that_breaks_is_opened_again() {
    let cluster = EtcdCluster::start(1).await;
    let member = cluster.endpoint(0);
    let direct = cluster.client().await;
    let (proxy, through_proxy) = common::behind_proxy(&member).await;
    let ours = Session::builder(through_proxy).build().await.unwrap();
    let theirs = Session::builder(direct.clone()).build().await.unwrap();
    let mutex = after_a_wait(&ours, &theirs, &direct, &unique("kept-watch")).await;
    // Our queue watch is the one watch stream on the member, kept between calls.
    within(secs(5), watch_streams_become(&member, 1)).await;

    proxy.cut();
    within(secs(5), watch_streams_become(&member, 0)).await;
    proxy.heal();
    within(secs(10), watch_streams_become(&member, 1)).await;
    drop(mutex);
}

#[tokio::test]
async fn a_join_attempt_that_reaches_etcd_after_the_unlock_leaves_no_key() {
    a_late_join_leaves_no_key(async |session, name| {
        let started = Instant::now();
        let guard = within(THROUGH_TWO_PATHS, Mutex::new(session, name).lock())
            .await
            .unwrap();
        let took = started.elapsed();
        within(THROUGH_TWO_PATHS, guard.unlock()).await.unwrap();
        took
    })
    .await;
}

#[tokio::test]
async fn a_lock_or_try_lock_in_flight_fails_with_session_lost_when_its_session_is_closed() {
    let cluster = EtcdCluster::start(1).await;
    let (proxy, client) = common::behind_proxy(&cluster.endpoint(0)).await;
    let patient = || {
        Session::builder(client.clone())
            .request_timeout(Duration::MAX)
            .build()
    };
    let (a, b) = (patient().await.unwrap(), patient().await.unwrap());
    let name = unique("closed-in-flight");
    let (mutex_a, mutex_b) = (Mutex::new(&a, &name), Mutex::new(&b, &name));
    proxy.stall();
    // On its first poll each call starts its join Txn, which the proxy holds.
    let mut locking = pin!(mutex_a.lock());
    assert!(futures::poll!(&mut locking).is_pending());
    let mut trying = pin!(mutex_b.try_lock());
    assert!(futures::poll!(&mut trying).is_pending());
    drop(a.close());
    drop(b.close());
    assert!(matches!(
        within(secs(5), locking).await,
        Err(Error::SessionLost)
    ));
    assert!(matches!(
        within(secs(5), trying).await,
        Err(Error::SessionLost)
    ));
    proxy.heal();
}

#[tokio::test]
async fn a_lock_in_flight_when_its_session_expires_fails_with_session_lost() {
    let cluster = EtcdCluster::start(1).await;
    let (proxy, client) = common::behind_proxy(&cluster.endpoint(0)).await;
    // Keep-alives stall too: the session is lost 2 s after its last renewal at the
    // latest, before its join Txn's request timeout (5 s) runs out.
    let session = Session::builder(client).ttl(secs(2)).build().await.unwrap();
    proxy.stall();
    let got = within(secs(10), Mutex::new(&session, unique("expired")).lock()).await;
    assert!(matches!(got, Err(Error::SessionLost)), "{got:?}");
    proxy.heal();
}

/// The key of a lost session goes with its lease: an unlock waits on etcd no longer, even
/// with an unlimited request timeout and etcd out of reach.
#[tokio::test]
async fn an_unlock_returns_session_lost_once_the_lease_ends_even_with_etcd_out_of_reach() {
    let cluster = EtcdCluster::start(1).await;
    let (proxy, client) = common::behind_proxy(&cluster.endpoint(0)).await;
    let session = common::session_with(client, secs(2), Duration::MAX).await;
    let (first, second) = (unique("unlock-lost"), unique("unlock-lost"));
    let in_flight = within(secs(5), Mutex::new(&session, first).lock())
        .await
        .unwrap();
    let after = within(secs(5), Mutex::new(&session, second).lock())
        .await
        .unwrap();
    proxy.stall(); // keep-alives too: lost 2 s after the last renewal at the latest
    let mut unlocking = pin!(in_flight.unlock());
    assert!(futures::poll!(&mut unlocking).is_pending());
    let unlocked = within(secs(5), unlocking).await;
    assert!(session.is_lost());
    assert!(matches!(unlocked, Err(Error::SessionLost)), "{unlocked:?}");
    // Already lost: at once, with no request (the proxy would hold it).
    let unlocked = within(millis(500), after.unlock()).await;
    assert!(matches!(unlocked, Err(Error::SessionLost)), "{unlocked:?}");
    proxy.heal();
}

/// Closed, the lease took the keys: nothing to send. Orphaned, it keeps them, perhaps
/// resumed by another session past the orphan's own reckoning of its expiry, and an
/// explicit unlock or resign still deletes its own.
#[tokio::test]
async fn unlock_and_resign_return_session_lost_after_close_and_delete_after_orphan() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let closed = session(&client).await;
    let held = common::hold_lock_and_lead(&closed, &unique("closed"), secs(5)).await;
    closed.close().await.unwrap();
    let unlocked = within(secs(5), held.guard.unlock()).await;
    assert!(matches!(unlocked, Err(Error::SessionLost)), "{unlocked:?}");
    let resigned = within(secs(5), held.leadership.resign()).await;
    assert!(matches!(resigned, Err(Error::SessionLost)), "{resigned:?}");

    let orphaned = common::session_with(client.clone(), secs(2), secs(5)).await;
    let Held {
        guard, leadership, ..
    } = common::hold_lock_and_lead(&orphaned, &unique("orphaned"), secs(5)).await;
    let keys = [guard.key().to_vec(), leadership.key().to_vec()];
    let lease = orphaned.lease_id();
    orphaned.orphan();
    let resumed = Session::builder(client.clone()).lease(lease).build().await;
    let resumed = resumed.unwrap();
    // Past the orphan's last renewal + TTL: what it no longer renews, `resumed` does.
    tokio::time::sleep(secs(3)).await;
    within(secs(5), guard.unlock()).await.unwrap();
    within(secs(5), leadership.resign()).await.unwrap();
    for key in keys {
        assert!(
            !exists(&client, key).await,
            "an orphan's unlocked key stays"
        );
    }
    resumed.close().await.unwrap();
}

#[tokio::test]
async fn a_kept_queue_watch_is_closed_once_unused_for_a_while_and_opened_again_when_needed() {
    let cluster = EtcdCluster::start(1).await;
    let member = cluster.endpoint(0);
    let client = cluster.client().await;
    let (ours, theirs) = (session(&client).await, session(&client).await);
    let name = unique("kept-idle");
    let mutex = after_a_wait(&ours, &theirs, &client, &name).await;
    within(secs(5), watch_streams_become(&member, 1)).await;
    // Kept for the next call soon after, not for as long as the handle lives: a
    // long-lived session with handles on many names would keep a watch per name.
    within(secs(30), watch_streams_become(&member, 0)).await;
    // The next wait opens it again and still sees its turn come.
    let again = after_a_wait(&ours, &theirs, &client, &name).await;
    within(secs(5), watch_streams_become(&member, 1)).await;
    let guard = within(secs(5), again.lock()).await.unwrap();
    guard.unlock().await.unwrap();
    drop((mutex, again));
    within(secs(5), watch_streams_become(&member, 0)).await;
}

#[tokio::test]
async fn a_kept_queue_watch_is_closed_after_hearing_releases_it_does_not_use() {
    let cluster = EtcdCluster::start(1).await;
    let member = cluster.endpoint(0);
    let client = cluster.client().await;
    let (ours, theirs) = (session(&client).await, session(&client).await);
    let name = unique("kept-releases");
    let _mutex = after_a_wait(&ours, &theirs, &client, &name).await;
    within(secs(5), watch_streams_become(&member, 1)).await;
    // Each release reaches the kept watch: past 16 of them it is no longer worth keeping.
    let busy = Mutex::new(&theirs, &name);
    for _ in 0..20 {
        let guard = within(secs(5), busy.lock()).await.unwrap();
        guard.unlock().await.unwrap();
    }
    within(secs(5), watch_streams_become(&member, 0)).await;
}

#[tokio::test]
async fn the_queue_watch_a_mutex_keeps_between_calls_is_closed_with_its_session() {
    let cluster = EtcdCluster::start(1).await;
    let member = cluster.endpoint(0);
    let client = cluster.client().await;
    let (ours, theirs) = (session(&client).await, session(&client).await);
    let mutex = after_a_wait(&ours, &theirs, &client, &unique("kept-then-closed")).await;
    within(secs(5), watch_streams_become(&member, 1)).await;
    // The handle stays, but no call of a closed session can use the watch.
    ours.close().await.unwrap();
    within(secs(5), watch_streams_become(&member, 0)).await;
    drop(mutex);
}

#[tokio::test]
async fn a_stale_guards_ownership_compare_fails_once_its_lease_holds_the_key_again() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let name = unique("stale-compare");
    let data = format!("{name}-data");
    let (_first, stale, newer) = stale_and_newer(&mut client, &name).await;
    let write = |guard: &MutexGuard, value: &'static str| {
        Txn::new()
            .when([guard.ownership_compare()])
            .and_then([TxnOp::put(data.as_str(), value, None)])
    };
    let answer = client.txn(write(&stale, "stale")).await.unwrap();
    assert!(
        !answer.succeeded(),
        "the stale holder's fenced write went in"
    );
    let answer = client.txn(write(&newer, "newer")).await.unwrap();
    assert!(answer.succeeded(), "the holder's fenced write was refused");
    newer.unlock().await.unwrap();
}

/// A dropped guard holds its session's slot on the name until its background delete is
/// done: a `try_lock` right after the drop says busy, instead of joining the key that is
/// about to vanish, and the next `lock()` gets a key that stays.
#[tokio::test]
async fn try_lock_right_after_a_guard_is_dropped_says_busy_until_its_key_is_deleted() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let ours = session(&client).await;
    let mutex = Mutex::new(&ours, unique("dropped-then-tried"));
    let guard = within(secs(10), mutex.lock()).await.unwrap();
    let token = guard.fencing_token();
    drop(guard);
    let tried = mutex.try_lock().await.unwrap();
    assert!(
        tried.is_none(),
        "took the lock while its key was being deleted"
    );
    let guard = within(secs(5), mutex.lock()).await.unwrap();
    assert!(guard.fencing_token() > token);
    assert!(exists(&client, guard.key()).await);
    guard.unlock().await.unwrap();
}

/// A `lock()` cancelled while its join is in flight holds its session's slot on the name
/// until the join is undone: a `try_lock` right after says busy, instead of taking up the
/// key the undo is about to delete.
#[tokio::test]
async fn try_lock_right_after_a_lock_cancelled_in_flight_says_busy_until_it_is_undone() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("cancelled-then-tried");
    let ours = session(&client).await;
    let mutex = Mutex::new(&ours, &name);
    let mut locking = Box::pin(mutex.lock());
    assert!(futures::poll!(locking.as_mut()).is_pending()); // the join Txn is sent
    drop(locking);
    let tried = mutex.try_lock().await.unwrap();
    assert!(
        tried.is_none(),
        "took the lock while a cancelled join was undone"
    );
    within(secs(5), common::no_keys_under(&client, &name)).await;
    let guard = within(secs(5), mutex.lock()).await.unwrap();
    assert!(exists(&client, guard.key()).await);
    guard.unlock().await.unwrap();
}

/// A queue whose keys together are over the client's 4 MiB answer limit (here 70 waiters
/// under a 64 KiB name) is joined and waited on, as a shorter one: the join Txn, applied
/// but its answer too large to take, is sent again without the queue read, and the waiter
/// reads the queue in parts. Before, `lock()` failed at once with the client's "decoded
/// message length too large", leaving its key, and so did every later `lock()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_whose_keys_are_over_the_answer_limit_is_waited_on() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = format!("{}/{}", unique("long-queue"), "n".repeat(64 << 10));
    let holder = session(&client).await;
    let held = within(secs(5), Mutex::new(&holder, &name).lock())
        .await
        .unwrap();
    let others = client.clone().lease_grant(60, None).await.unwrap().id();
    for i in 0..70 {
        let on_lease = etcd_client::PutOptions::new().with_lease(others);
        let key = format!("{name}/{:x}", 0x1000 + i);
        client.clone().put(key, "", Some(on_lease)).await.unwrap();
    }
    let ours = session(&client).await;
    let mutex = Mutex::new(&ours, &name);
    let mut waiter = tokio::spawn({
        let mutex = mutex.clone();
        async move { mutex.lock().await }
    });
    within(secs(10), appears(&client, &hex_key(&name, &ours))).await;
    let early = tokio::time::timeout(millis(300), &mut waiter).await;
    assert!(
        early.is_err(),
        "lock() returned instead of waiting: {:?}",
        early.map(|locked| locked.unwrap().map(|guard| guard.fencing_token()))
    );

    within(secs(5), held.unlock()).await.unwrap();
    client.clone().lease_revoke(others).await.unwrap();
    let guard = within(secs(10), waiter).await.unwrap().unwrap();
    within(secs(5), guard.unlock()).await.unwrap();
    let left = client
        .clone()
        .get(
            name.as_str(),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(left.count(), 0, "keys left under the name");
}
