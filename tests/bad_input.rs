//! Bad input and hostile conditions not covered next to their primitive: authentication
//! failures, forgotten auth tokens, permissions, dead endpoints. Each gives a clear typed
//! error in bounded time and leaves nothing behind. (Empty and prefix names, stray
//! lease-less keys, bad TTLs, oversized values, revoked leases and compaction are tested in
//! `mutex.rs`, `election.rs`, `session.rs` and `stm.rs`.)

mod common;

use common::{keys_under, millis, secs, unique, within};
use etcd_client::{Client, ConnectOptions, Permission, RoleRevokePermissionOptions};
use etcd_concurrency::testing::EtcdCluster;
use etcd_concurrency::{Election, Error, Isolation, Mutex, ReadCache, Session, Stm};
use futures::StreamExt;

/// Enables authentication with `root`/`root-secret` and a user `reader`/`reader-secret`
/// that may only read keys under `/allowed/`.
async fn enable_auth(client: &mut Client) {
    client.user_add("root", "root-secret", None).await.unwrap();
    client.user_grant_role("root", "root").await.unwrap();
    client.role_add("reader").await.unwrap();
    let read = Permission::read("/allowed/").with_prefix();
    client.role_grant_permission("reader", read).await.unwrap();
    client
        .user_add("reader", "reader-secret", None)
        .await
        .unwrap();
    client.user_grant_role("reader", "reader").await.unwrap();
    client.auth_enable().await.unwrap();
}

async fn connect_as(
    cluster: &EtcdCluster,
    user: &str,
    password: &str,
) -> Result<Client, etcd_client::Error> {
    let options = ConnectOptions::new().with_user(user, password);
    Client::connect(cluster.endpoints(), Some(options)).await
}

#[tokio::test]
async fn a_wrong_password_and_missing_permissions_give_clear_errors() {
    let cluster = EtcdCluster::start(1).await;
    enable_auth(&mut cluster.client().await).await;

    let wrong = within(secs(5), connect_as(&cluster, "root", "wrong")).await;
    let error = wrong.err().expect("a wrong password must not connect");
    assert!(
        error.to_string().contains("authentication failed"),
        "{error}"
    );

    let reader = connect_as(&cluster, "reader", "reader-secret")
        .await
        .unwrap();
    let session = within(secs(5), Session::new(reader.clone())).await.unwrap();
    let name = unique("forbidden");
    let denied = |result: &Result<(), Error>| {
        matches!(result, Err(error @ Error::Etcd(_)) if !error.is_transient()
            && error.to_string().contains("permission denied"))
    };
    let locked = within(secs(5), Mutex::new(&session, &name).lock())
        .await
        .map(drop);
    assert!(denied(&locked), "{locked:?}");
    let campaigned = within(secs(5), Election::new(&session, &name).campaign("x"))
        .await
        .map(drop);
    assert!(denied(&campaigned), "{campaigned:?}");
    let observed = Election::new(&session, &name);
    let first = within(secs(5), observed.observe().next()).await.unwrap();
    assert!(
        denied(&first.map(drop)),
        "observe must report the refusal, not retry forever"
    );
    let cached = within(secs(5), ReadCache::watch(reader.clone(), name.as_str()))
        .await
        .map(drop);
    assert!(denied(&cached), "{cached:?}");
    let stm = Stm::new(reader.clone());
    let ran = within(secs(5), stm.run(async |tx| tx.get(&name).await.map(drop))).await;
    assert!(denied(&ran), "{ran:?}");

    let root = connect_as(&cluster, "root", "root-secret").await.unwrap();
    assert!(
        keys_under(&root, &name).await.is_empty(),
        "a refused lock left a key"
    );
}

/// A client of `root` (see [`enable_auth`]) at `endpoints` that renews its token when
/// etcd refuses a request for it (etcd-client's auto-refresh, for requests that are not
/// streams).
async fn connect_as_root(endpoints: &[String]) -> Client {
    let options = ConnectOptions::new()
        .with_user("root", "root-secret")
        .with_auto_token_refresh(true);
    Client::connect(endpoints, Some(options)).await.unwrap()
}

/// Turns authentication off and on again: etcd forgets every token it gave out, as when
/// one goes unused for `--auth-token-ttl` (5 min by default) or its member restarts.
async fn forget_tokens(cluster: &EtcdCluster, root: &Client) {
    root.clone().auth_disable().await.unwrap();
    cluster.client().await.auth_enable().await.unwrap();
}

/// An auth cluster where a leader proclaimed "v1" through a root client, and a session
/// of another root client that reaches etcd through a proxy, to watch the election.
struct ForgottenToken {
    cluster: EtcdCluster,
    proxy: etcd_concurrency::testing::Proxy,
    writer: Client,
    leading: etcd_concurrency::Leadership,
    watcher: Session,
}

impl ForgottenToken {
    async fn start(name: &str) -> ForgottenToken {
        let cluster = EtcdCluster::start(1).await;
        enable_auth(&mut cluster.client().await).await;
        let writer = connect_as_root(&cluster.endpoints()).await;
        let proxy = etcd_concurrency::testing::Proxy::start(&cluster.endpoint(0))
            .await
            .unwrap();
        let reader = connect_as_root(&[proxy.endpoint()]).await;
        let leader = within(secs(5), Session::new(writer.clone())).await.unwrap();
        let leading = within(secs(10), Election::new(&leader, name).campaign("v1"))
            .await
            .unwrap();
        let watcher = within(secs(5), Session::new(reader)).await.unwrap();
        ForgottenToken {
            cluster,
            proxy,
            writer,
            leading,
            watcher,
        }
    }

    /// Makes etcd forget every token it gave out.
    async fn forget(&self) {
        forget_tokens(&self.cluster, &self.writer).await;
    }

    /// Breaks the watcher's connection, so that its watches are opened again with the
    /// forgotten token, and proclaims "v2".
    async fn reopen_and_proclaim(&self) {
        self.proxy.cut();
        self.proxy.heal();
        within(secs(10), self.leading.proclaim("v2")).await.unwrap();
    }
}

/// A watch opened again after etcd forgot the client's token is refused in the watch's
/// created answer ("invalid auth token"), where etcd-client does not renew the token:
/// the follower renews it and opens the watch again, so the observer hears the next
/// proclaim instead of yielding that refusal for good.
#[tokio::test]
async fn an_observer_whose_token_etcd_forgot_hears_the_next_proclaim() {
    let name = unique("token-forgotten");
    let setup = ForgottenToken::start(&name).await;
    let election = Election::new(&setup.watcher, &name);
    let mut observer = election.observe();
    let first = within(secs(10), observer.next()).await.unwrap().unwrap();
    assert_eq!(first.unwrap().value(), b"v1");

    setup.forget().await;
    setup.reopen_and_proclaim().await;
    let next = within(secs(10), observer.next()).await.unwrap();
    assert_eq!(next.unwrap().unwrap().value(), b"v2");
}

/// Every follower of a client is refused at once when etcd forgets its token: they renew
/// it once between them, not each (each renewal is a bcrypt hash and a raft entry on etcd).
#[tokio::test]
async fn followers_refused_for_one_token_renew_it_once() {
    let name = unique("token-forgotten-by-many");
    let setup = ForgottenToken::start(&name).await;
    let mut observers = Vec::new();
    for _ in 0..40 {
        let mut observer = Election::new(&setup.watcher, &name).observe();
        within(secs(10), observer.next()).await.unwrap().unwrap();
        observers.push(observer);
    }
    setup.forget().await;
    let raft_index = async || setup.writer.clone().status().await.unwrap().raft_index();
    let before = raft_index().await;
    setup.reopen_and_proclaim().await;
    // All at once, as observers on tasks of their own would.
    let nexts = observers.iter_mut().map(|observer| observer.next());
    for next in within(secs(30), futures::future::join_all(nexts)).await {
        assert_eq!(next.unwrap().unwrap().unwrap().value(), b"v2");
    }
    // The proclaim, and a renewal or two (measured: 3 entries in all; a renewal each
    // makes 42).
    let entries = raft_index().await - before;
    assert!(
        entries <= 6,
        "{entries} raft entries: a renewal per follower"
    );
}

/// A leadership's `while_leading` opens a watch on its key: with a token etcd forgot, the
/// refusal must not pass for the leadership's loss.
#[tokio::test]
async fn while_leading_runs_the_job_of_a_leader_whose_token_etcd_forgot() {
    let cluster = EtcdCluster::start(1).await;
    enable_auth(&mut cluster.client().await).await;
    let client = connect_as_root(&cluster.endpoints()).await;
    let session = within(secs(5), Session::new(client.clone())).await.unwrap();
    let election = Election::new(&session, unique("token-forgotten-leader"));
    let leadership = within(secs(10), election.campaign("v1")).await.unwrap();
    forget_tokens(&cluster, &client).await;
    let job = leadership.while_leading(tokio::time::sleep(secs(1)));
    assert!(
        within(secs(10), job).await.is_some(),
        "while_leading stopped the job of a leader that leads"
    );
}

/// A request authenticated before a change of the auth store (any user, role or
/// permission) and applied after it is refused ("revision of auth store is old"), applying
/// nothing: it is retried, as Go's client does, so no lock or unlock fails for it, no
/// held lock passes for lost, and no key is left behind. One task thread, so that the log
/// captures the retries.
#[tokio::test]
async fn requests_racing_a_change_of_the_auth_store_are_retried() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let (log, _capture) = common::DebugLog::capture();
    let cluster = EtcdCluster::start(1).await;
    enable_auth(&mut cluster.client().await).await;
    let client = connect_as_root(&cluster.endpoints()).await;
    let session = within(secs(5), Session::new(client.clone())).await.unwrap();
    let name = unique("auth-store-changing");
    let stop = Arc::new(AtomicBool::new(false));
    let mut admin = client.clone();
    let changing = tokio::spawn({
        let stop = stop.clone();
        async move {
            for n in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let key = format!("/elsewhere/{}", n % 4);
                let read = Permission::read(key.as_str());
                admin.role_grant_permission("reader", read).await.unwrap();
                // A change every few requests, not one in every request's way: retried
                // requests must get through before the request timeout on a loaded CI.
                tokio::time::sleep(millis(10)).await;
            }
        }
    });
    let mutex = Mutex::new(&session, &name);
    for _ in 0..200 {
        let guard = within(secs(10), mutex.lock()).await.unwrap();
        let lost = tokio::time::timeout(millis(5), guard.lost()).await;
        assert!(lost.is_err(), "a held lock passed for lost");
        within(secs(10), guard.unlock()).await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    within(secs(10), changing).await.unwrap();
    // The race did happen, and was retried (23-31 times per run, measured).
    let raced = log.lines_with("revision of auth store is old");
    assert!(raced > 0, "no request met a change of the auth store");
    assert!(keys_under(&client, &name).await.is_empty());
}

/// The session's sweep for keys of late joins goes on past a key it may no longer read:
/// the keys of the session's other cut-off locks are still deleted, instead of every sweep
/// ending at the refused one (the order of the remembered keys is the hash map's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_goes_on_past_a_key_it_may_not_read() {
    let cluster = EtcdCluster::start(1).await;
    enable_auth(&mut cluster.client().await).await;
    let root = connect_as_root(&cluster.endpoints()).await;
    let prefix = unique("sweep-refused");
    let unreadable = format!("{prefix}/unreadable/");
    let readable = format!("{prefix}/readable/");
    let mut admin = root.clone();
    admin.role_add("sweeper").await.unwrap();
    for range in [&unreadable, &readable] {
        let both = Permission::read_write(range.as_str()).with_prefix();
        admin.role_grant_permission("sweeper", both).await.unwrap();
    }
    admin.user_add("sweeper", "secret", None).await.unwrap();
    admin.user_grant_role("sweeper", "sweeper").await.unwrap();
    let proxy = etcd_concurrency::testing::Proxy::start(&cluster.endpoint(0))
        .await
        .unwrap();
    let options = ConnectOptions::new()
        .with_user("sweeper", "secret")
        .with_auto_token_refresh(true);
    let client = Client::connect([proxy.endpoint()], Some(options))
        .await
        .unwrap();
    let session = common::session_with(client, secs(30), secs(1)).await;

    // Locks cut off by the request timeout: their outcome unknown, the session remembers
    // their keys.
    proxy.stall();
    let names: Vec<String> = std::iter::once(format!("{unreadable}lock"))
        .chain((0..11).map(|i| format!("{readable}lock-{i}")))
        .collect();
    let session_ref = &session;
    let locks = names.iter().map(|name| async move {
        let locked = within(secs(5), Mutex::new(session_ref, name).lock()).await;
        assert!(matches!(&locked, Err(Error::Timeout { .. })), "{locked:?}");
    });
    futures::future::join_all(locks).await;
    // Incarnations no handle took up, as join attempts delivered late make them; and the
    // session may still write the first lock's key, but no longer read it.
    for name in &names {
        let on_lease = etcd_client::PutOptions::new().with_lease(session.lease_id());
        let key = common::hex_key(name, &session);
        admin.put(key, "", Some(on_lease)).await.unwrap();
    }
    let range = Some(RoleRevokePermissionOptions::new().with_prefix());
    admin
        .role_revoke_permission("sweeper", unreadable.as_str(), range)
        .await
        .unwrap();
    let write_only = Permission::write(unreadable.as_str()).with_prefix();
    admin
        .role_grant_permission("sweeper", write_only)
        .await
        .unwrap();
    proxy.heal();

    // Sweeps come at most 10 s apart.
    within(secs(25), common::no_keys_under(&root, &readable)).await;
    assert_eq!(keys_under(&root, &unreadable).await.len(), 1);
    within(secs(10), session.close()).await.unwrap();
    assert!(keys_under(&root, &prefix).await.is_empty());
}

#[tokio::test]
async fn a_cluster_that_goes_away_gives_errors_in_bounded_time() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let session = common::session_with(client.clone(), secs(5), secs(1)).await;
    let mutex = Mutex::new(&session, unique("gone"));
    let stm = Stm::new(client.clone()).request_timeout(secs(1));
    cluster.kill(0); // connections are refused from now on

    let locked = within(secs(3), mutex.lock()).await;
    assert!(
        matches!(&locked, Err(error) if error.is_transient()),
        "{locked:?}"
    );
    let ran = within(secs(3), stm.run(async |tx| tx.get("k").await)).await;
    assert!(
        matches!(&ran, Err(error) if error.is_transient()),
        "{ran:?}"
    );
    // A commit refused until the deadline says so, as a read does, not "no answer".
    let written = within(
        secs(3),
        stm.run(async |tx| {
            tx.put("k", "v");
            Ok::<_, Error>(())
        }),
    )
    .await;
    assert!(
        matches!(&written, Err(error @ Error::Etcd(_)) if error.is_transient()),
        "{written:?}"
    );
    within(secs(6), session.lost()).await;
}

/// A `lock()` that never reached etcd (its connection refused) created nothing, so it
/// leaves nothing to undo: the session's next `try_lock()` and `lock()` on the name get
/// the same error at once, instead of finding the name busy with a clean-up that waits
/// for etcd; and once etcd is back, the lock is taken.
#[tokio::test]
async fn a_lock_that_never_reached_etcd_leaves_nothing_to_undo() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let session = common::session_with(client.clone(), secs(60), secs(1)).await;
    let mutex = Mutex::new(&session, unique("refused"));
    cluster.kill(0);
    within(secs(5), connection_refused(&client)).await;

    let locked = within(secs(3), mutex.lock()).await;
    assert!(
        matches!(&locked, Err(error) if error.is_transient()),
        "{locked:?}"
    );
    let tried = within(secs(3), mutex.try_lock()).await;
    assert!(
        matches!(&tried, Err(error) if error.is_transient()),
        "busy instead of failing: {tried:?}"
    );
    let locked = within(secs(3), mutex.lock()).await;
    assert!(
        matches!(&locked, Err(error) if error.is_transient()),
        "{locked:?}"
    );

    cluster.restart(0).await;
    let guard = within(secs(10), mutex.lock()).await.unwrap();
    within(secs(5), guard.unlock()).await.unwrap();
}

/// A cache whose watch etcd refuses for good (its user lost the permission to read the
/// prefix) stops, and transactions read from etcd again, as `ReadCache`'s docs say,
/// instead of reading its last copy, or an empty one.
#[tokio::test]
async fn transactions_read_etcd_once_a_cache_whose_watch_is_refused_has_stopped() {
    let cluster = EtcdCluster::start(1).await;
    let admin = cluster.client().await;
    // Under `/allowed/`, which `reader` may read until the permission is revoked.
    let prefix = format!("/allowed{}", unique("stopped-cache"));
    let key = format!("{prefix}/key");
    admin
        .clone()
        .put(key.as_str(), "before", None)
        .await
        .unwrap();
    enable_auth(&mut admin.clone()).await;
    let root = connect_as(&cluster, "root", "root-secret").await.unwrap();
    // The reader's cache reaches etcd through a proxy, to break its watch at will.
    let proxy = etcd_concurrency::testing::Proxy::start(&cluster.endpoint(0))
        .await
        .unwrap();
    let options = ConnectOptions::new().with_user("reader", "reader-secret");
    let reader = Client::connect([proxy.endpoint()], Some(options))
        .await
        .unwrap();
    let cache = within(secs(5), ReadCache::watch(reader, prefix.as_str()))
        .await
        .unwrap();
    assert!(cache.revision() > 0);

    root.clone()
        .role_revoke_permission(
            "reader",
            "/allowed/",
            Some(RoleRevokePermissionOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    // The watch is opened again, and refused.
    proxy.cut();
    proxy.heal();
    within(secs(10), async {
        while cache.revision() != 0 {
            tokio::time::sleep(millis(20)).await;
        }
    })
    .await;
    // Written only now, so that no copy can have it: only reads from etcd see it.
    root.clone().put(key.as_str(), "after", None).await.unwrap();

    for isolation in [Isolation::ReadCommitted, Isolation::SerializableSnapshot] {
        let stm = Stm::new(root.clone())
            .read_cache(cache.clone())
            .isolation(isolation);
        let read = within(secs(5), stm.run(async |tx| tx.get(&key).await)).await;
        assert_eq!(
            read.unwrap().as_deref(),
            Some(&b"after"[..]),
            "{isolation:?}"
        );
    }
}

/// An observe whose watch etcd refuses (permission denied) yields the error and then
/// backs off before trying again, instead of yielding errors as fast as etcd refuses
/// (each refusal takes a round trip of a millisecond or so).
#[tokio::test]
async fn an_observe_refused_backs_off_between_errors() {
    let cluster = EtcdCluster::start(1).await;
    enable_auth(&mut cluster.client().await).await;
    let reader = connect_as(&cluster, "reader", "reader-secret")
        .await
        .unwrap();
    let session = within(secs(5), Session::new(reader)).await.unwrap();
    let election = Election::new(&session, unique("forbidden-observe"));
    let mut observer = election.observe();
    let mut errors = 0;
    let _ = tokio::time::timeout(secs(2), async {
        while let Some(Err(_)) = observer.next().await {
            errors += 1;
        }
    })
    .await;
    // Back-off steps from 20 ms doubling to 1 s: about ten errors in 2 s.
    assert!((1..=30).contains(&errors), "{errors} errors in 2 s");
}

/// A campaign that never reached etcd (its connection refused) wrote nothing, so it
/// leaves nothing to undo, as for a lock: the session's next campaign in the election
/// gets the same error at once, instead of waiting (until etcd answers, or the session
/// is lost a TTL later) for the look-up of a key that cannot exist; and once etcd is
/// back, the election is won.
#[tokio::test]
async fn a_campaign_that_never_reached_etcd_leaves_nothing_to_undo() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let session = common::session_with(client.clone(), secs(60), secs(1)).await;
    let election = Election::new(&session, unique("refused-campaign"));
    cluster.kill(0);
    within(secs(5), connection_refused(&client)).await;

    for _ in 0..2 {
        // As a caller that tries again after a pause would.
        tokio::time::sleep(millis(100)).await;
        let campaigned = tokio::time::timeout(secs(3), election.campaign("x")).await;
        assert!(
            matches!(&campaigned, Ok(Err(error)) if error.is_transient()),
            "waiting instead of failing: {:?}",
            campaigned.map(|result| result.map(drop))
        );
    }

    cluster.restart(0).await;
    let leading = within(secs(10), election.campaign("x")).await.unwrap();
    within(secs(5), leading.resign()).await.unwrap();
}

/// A snapshot compacted in the middle of an attempt (no read cache: a long attempt) makes
/// the read fail with etcd's "compacted" error; returned with `?`, the closure runs again
/// from a fresh snapshot, which is no conflict, and the run commits.
#[tokio::test]
async fn an_stm_snapshot_compacted_during_an_attempt_runs_it_again() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("stm-compacted");
    let (first, second) = (format!("{prefix}/first"), format!("{prefix}/second"));
    client.clone().put(first.as_str(), "1", None).await.unwrap();
    client
        .clone()
        .put(second.as_str(), "2", None)
        .await
        .unwrap();
    let runs = std::sync::atomic::AtomicU32::new(0);
    let stm = Stm::new(client.clone()).max_attempts(1);
    let sum = within(
        secs(10),
        stm.run(async |tx| {
            let run = runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let a = tx.get(&first).await?.unwrap();
            if run == 0 {
                // The snapshot (the first read's revision) is compacted away.
                let mut admin = client.clone();
                admin
                    .put(format!("{prefix}/other"), "x", None)
                    .await
                    .unwrap();
                let now = admin
                    .put(format!("{prefix}/other"), "y", None)
                    .await
                    .unwrap();
                let revision = now.header().unwrap().revision();
                admin.compact(revision, None).await.unwrap();
            }
            let b = tx.get(&second).await?.unwrap();
            tx.put(format!("{prefix}/sum"), [a, b].concat());
            Ok::<_, Error>(())
        }),
    )
    .await;
    sum.unwrap();
    assert_eq!(runs.into_inner(), 2);
    let answer = client
        .clone()
        .get(format!("{prefix}/sum"), None)
        .await
        .unwrap();
    assert_eq!(answer.kvs()[0].value(), b"12");
}

/// Just over etcd's request limit (1.5 MiB), under its gRPC message limit (2 MiB): etcd's
/// own refusal, not transient, and nothing written; and a commit of more writes than one
/// Txn may hold (etcd's `--max-txn-ops`, 128) is refused the same way.
#[tokio::test]
async fn stm_commits_over_etcds_limits_are_refused_and_write_nothing() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let prefix = unique("stm-limits");
    let stm = Stm::new(client.clone());
    let result = within(
        secs(10),
        stm.run(async |tx| {
            tx.put(format!("{prefix}/small"), "ok");
            tx.put(format!("{prefix}/big"), vec![b'x'; 1_600_000]);
            Ok::<_, Error>(())
        }),
    )
    .await;
    let error = result.unwrap_err();
    assert!(matches!(error, Error::Etcd(_)), "{error:?}");
    assert!(!error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("request is too large"),
        "{error}"
    );
    let result = within(
        secs(10),
        stm.run(async |tx| {
            for i in 0..129 {
                tx.put(format!("{prefix}/{i}"), "v");
            }
            Ok::<_, Error>(())
        }),
    )
    .await;
    let error = result.unwrap_err();
    assert!(matches!(error, Error::Etcd(_)), "{error:?}");
    assert!(!error.is_transient(), "{error}");
    assert!(keys_under(&client, &prefix).await.is_empty());
}

/// Returns once `client`'s requests are refused a connection: until the client has seen
/// its connection close, a request may still be sent on it.
async fn connection_refused(client: &Client) {
    while !client
        .clone()
        .get("probe", None)
        .await
        .is_err_and(|error| error.to_string().contains("tcp connect error"))
    {}
}
