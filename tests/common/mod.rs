//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses its own subset

pub mod faults;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions, GetResponse, WatchOptions};
use etcd_concurrency::{Election, Leadership, Mutex, MutexGuard, Session, Stm, StmTxn};

/// The total length of the values of `keys` (0 for an absent one), read in `tx`.
pub async fn value_bytes(tx: &mut StmTxn, keys: &[String]) -> etcd_concurrency::Result<usize> {
    let mut bytes = 0;
    for key in keys {
        bytes += tx.get(key).await?.map_or(0, |value| value.len());
    }
    Ok(bytes)
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("did not finish within {limit:?}"),
    }
}

/// Runs `test` on a Tokio runtime of its own (two workers) on a thread of its own, and
/// fails if it has not finished, the runtime's shutdown included, within `limit`. Unlike
/// [`within`], this also fails a test whose runtime's threads all wait for a lock (a
/// deadlock stops its timers too); they are left behind, and with them the test's etcd
/// until the process ends.
pub fn on_a_thread_within(limit: Duration, test: impl Future<Output = ()> + Send + 'static) {
    let (finished, finish) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the test");
        runtime.block_on(test);
        drop(runtime);
        let _ = finished.send(());
    });
    match finish.recv_timeout(limit) {
        // Disconnected: the test panicked, which joining passes on.
        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("did not finish within {limit:?}: its runtime's threads are stuck")
        }
    }
}

pub fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

pub fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// An account balance stored as decimal text (absent: 0).
pub fn amount(value: Option<Vec<u8>>) -> u64 {
    value.map_or(0, |v| String::from_utf8(v).unwrap().parse().unwrap())
}

/// Moves a quarter of `from`'s balance to `to`, in `tx`.
pub async fn move_a_quarter(
    tx: &mut etcd_concurrency::StmTxn,
    from: &str,
    to: &str,
) -> etcd_concurrency::Result<()> {
    let from_balance = amount(tx.get(from).await?);
    let to_balance = amount(tx.get(to).await?);
    let moved = from_balance / 4;
    tx.put(from, (from_balance - moved).to_string());
    tx.put(to, (to_balance + moved).to_string());
    Ok(())
}

/// Each of `stms`, on its own task, makes `transfers` transfers of a quarter of one random
/// account's balance to another, all at once; fails the test if a transfer fails or all
/// take longer than `limit`.
pub async fn transfer_concurrently(
    stms: Vec<Stm>,
    accounts: &[String],
    transfers: usize,
    limit: Duration,
) {
    let accounts: Arc<[String]> = accounts.into();
    let mut workers = Vec::new();
    for stm in stms {
        let accounts = accounts.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..transfers {
                let (from, to) = two_accounts(accounts.len());
                let (from, to) = (accounts[from].clone(), accounts[to].clone());
                // Spawned: the closure owns what it uses (rust-lang/rust#139475).
                stm.run(async move |tx| move_a_quarter(tx, &from, &to).await)
                    .await
                    .expect("a transfer failed");
            }
        }));
    }
    within(limit, async {
        for worker in workers {
            worker.await.unwrap();
        }
    })
    .await;
}

/// The sum of the balances of `accounts`.
pub async fn total(client: &Client, accounts: &[String]) -> u64 {
    let mut sum = 0;
    for account in accounts {
        let answer = read(client, account.as_str(), None).await;
        sum += amount(answer.kvs().first().map(|kv| kv.value().to_vec()));
    }
    sum
}

/// Two distinct random indices below `count`: the accounts of a transfer.
pub fn two_accounts(count: usize) -> (usize, usize) {
    use rand::Rng;
    let mut rng = rand::rng();
    let from = rng.random_range(0..count);
    (from, (from + rng.random_range(1..count)) % count)
}

/// The key of `session` in the lock or election `name`: `name/<lease id in hex>`.
pub fn hex_key(name: &str, session: &Session) -> Vec<u8> {
    format!("{name}/{:x}", session.lease_id()).into_bytes()
}

/// A key prefix no other test uses.
pub fn unique(name: &str) -> String {
    format!("/test/{name}/{:08x}", rand::random::<u32>())
}

/// A read that retries for up to 5 s: after a member restarts, etcd-client may hand the
/// next request a stale connection error (the library retries those; tests must too).
/// Each attempt is bounded too, so a read that hangs fails the test.
pub async fn read(
    client: &Client,
    key: impl Into<Vec<u8>>,
    options: Option<GetOptions>,
) -> GetResponse {
    let key = key.into();
    let deadline = tokio::time::Instant::now() + secs(5);
    loop {
        let mut kv = client.clone();
        let attempt = kv.get(key.clone(), options.clone());
        let error = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(answer)) => return answer,
            Ok(Err(error)) => error.to_string(),
            Err(_) => panic!("read got no answer within 5 s"),
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("read failed: {error}");
        }
        eprintln!("read failed, retrying: {error}");
        tokio::time::sleep(millis(50)).await;
    }
}

/// A cluster started on a runtime of its own, for tests that count this runtime's tasks:
/// the clients that waited for its members to be ready end with that runtime, instead of
/// ending on this one at any time.
pub async fn cluster_off_this_runtime(members: usize) -> etcd_concurrency::testing::EtcdCluster {
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime to start the cluster on");
        runtime.block_on(etcd_concurrency::testing::EtcdCluster::start(members))
    })
    .await
    .expect("start the cluster")
}

/// Asserts that `session` is not lost for `span`, and that etcd (asked through `client`)
/// still has its lease then.
pub async fn assert_lives_for(
    session: &etcd_concurrency::Session,
    client: &Client,
    span: Duration,
) {
    let lost = tokio::time::timeout(span, session.lost()).await;
    assert!(lost.is_err(), "the session was lost");
    let lease = client
        .clone()
        .lease_time_to_live(session.lease_id(), None)
        .await
        .unwrap();
    assert!(lease.ttl() > 0, "etcd let the lease expire");
}

/// How many tasks are alive on this runtime once `client` has started etcd-client's own
/// (it spawns them on first use): the baseline for [`tasks_back_to`]. Start the cluster
/// with [`cluster_off_this_runtime`], or tasks of its start may end after this count.
pub async fn task_baseline(client: &Client) -> usize {
    client.clone().get("warm-up", None).await.unwrap();
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits (at most 5 s) until no more tasks are alive on this runtime than `baseline`:
/// background work has ended and nothing leaked.
pub async fn tasks_back_to(baseline: usize) {
    let metrics = tokio::runtime::Handle::current().metrics();
    within(secs(5), async {
        while metrics.num_alive_tasks() > baseline {
            tokio::time::sleep(millis(10)).await;
        }
    })
    .await;
}

/// The keys under `prefix`, as strings.
pub async fn keys_under(client: &Client, prefix: &str) -> Vec<String> {
    let answer = read(
        client,
        prefix,
        Some(GetOptions::new().with_prefix().with_keys_only()),
    )
    .await;
    answer
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

/// A lock held and an election led (with the value "first") by one session: their names,
/// the guard and the leadership.
pub struct Held {
    pub lock: String,
    pub guard: MutexGuard,
    pub election: String,
    pub leadership: Leadership,
}

/// Has `holder` lock `{name}/lock` and lead `{name}/election`, each within `limit`.
pub async fn hold_lock_and_lead(holder: &Session, name: &str, limit: Duration) -> Held {
    let lock = format!("{name}/lock");
    let guard = within(limit, Mutex::new(holder, &lock).lock())
        .await
        .unwrap();
    let election = format!("{name}/election");
    let leadership = within(limit, Election::new(holder, &election).campaign("first"))
        .await
        .unwrap();
    Held {
        lock,
        guard,
        election,
        leadership,
    }
}

/// A session on `client` whose lease lasts `ttl` and whose requests are given
/// `request_timeout`.
pub async fn session_with(client: Client, ttl: Duration, request_timeout: Duration) -> Session {
    Session::builder(client)
        .ttl(ttl)
        .request_timeout(request_timeout)
        .build()
        .await
        .unwrap()
}

/// A session on a 10 s lease granted with the chosen `id` (etcd grants any non-zero id it
/// is asked for), resumed with `SessionBuilder::lease`.
pub async fn session_on_lease(client: &Client, id: i64) -> Session {
    let granted = etcd_client::LeaseGrantOptions::new().with_id(id);
    client
        .lease_client()
        .grant(10, Some(granted))
        .await
        .unwrap();
    Session::builder(client.clone())
        .lease(id)
        .build()
        .await
        .unwrap()
}

/// A proxy in front of the etcd member at `endpoint`, and a client that reaches etcd only
/// through it.
pub async fn behind_proxy(endpoint: &str) -> (etcd_concurrency::testing::Proxy, Client) {
    let proxy = etcd_concurrency::testing::Proxy::start(endpoint)
        .await
        .unwrap();
    let client = Client::connect([proxy.endpoint()], None).await.unwrap();
    (proxy, client)
}

/// Waits until etcd holds no lease.
pub async fn no_leases(client: &Client) {
    while !client.clone().leases().await.unwrap().leases().is_empty() {
        tokio::time::sleep(millis(50)).await;
    }
}

/// Waits until no key is under `prefix`.
pub async fn no_keys_under(client: &Client, prefix: &str) {
    keys_under_become(client, prefix, |count| count == 0).await;
}

/// Waits until the number of keys under `prefix` is one `wanted` accepts: lists the keys,
/// then follows their creations and deletions through a watch from the listing's next
/// revision, so that no change is missed. A watch that breaks (its member went down) is
/// opened again after a fresh listing.
pub async fn keys_under_become(client: &Client, prefix: &str, wanted: impl Fn(usize) -> bool) {
    let keys_only = GetOptions::new().with_prefix().with_keys_only();
    loop {
        let listed = read(client, prefix, Some(keys_only.clone())).await;
        let mut keys: HashSet<Vec<u8>> = listed.kvs().iter().map(|kv| kv.key().to_vec()).collect();
        if wanted(keys.len()) {
            return;
        }
        let after = listed.header().expect("header").revision() + 1;
        let options = WatchOptions::new().with_prefix().with_start_revision(after);
        if let Ok(mut watch) = client.clone().watch(prefix, Some(options)).await {
            while let Ok(Some(answer)) = watch.message().await {
                for event in answer.events() {
                    let key = event.kv().expect("event's key").key().to_vec();
                    match event.event_type() {
                        etcd_client::EventType::Put => keys.insert(key),
                        etcd_client::EventType::Delete => keys.remove(&key),
                    };
                }
                if wanted(keys.len()) {
                    return;
                }
            }
        }
        // The watch could not be opened, or broke: a back-off before listing again.
        tokio::time::sleep(millis(50)).await;
    }
}

/// Whether `key` exists.
pub async fn exists(client: &Client, key: impl Into<Vec<u8>>) -> bool {
    !read(client, key, None).await.kvs().is_empty()
}

/// A watch for the deletion of a key that exists now, or of one yet to be created.
pub struct Deletion {
    watch: etcd_client::WatchStream,
    created_first: bool,
}

impl Deletion {
    /// Starts watching `key`, which must exist.
    pub async fn of(client: &Client, key: &str) -> Deletion {
        let watch = client.clone().watch(key, None).await.expect("watch");
        assert!(
            exists(client, key).await,
            "{key} should exist before it is deleted"
        );
        Deletion {
            watch,
            created_first: false,
        }
    }

    /// Starts watching `key`, which must not exist: it is to be created, then deleted.
    pub async fn after_creation_of(client: &Client, key: &str) -> Deletion {
        let watch = client.clone().watch(key, None).await.expect("watch");
        assert!(!exists(client, key).await, "{key} should not exist yet");
        Deletion {
            watch,
            created_first: true,
        }
    }

    /// Resolves when the key has been deleted (after being created, if so watched).
    pub async fn happened(mut self) {
        if self.created_first {
            next_event(&mut self.watch, etcd_client::EventType::Put).await;
        }
        next_event(&mut self.watch, etcd_client::EventType::Delete).await;
    }
}

/// Waits for an event of type `kind` on `watch`.
async fn next_event(watch: &mut etcd_client::WatchStream, kind: etcd_client::EventType) {
    next_event_where(watch, |event| event.event_type() == kind).await;
}

/// Waits for an event on `watch` that `wanted` accepts.
async fn next_event_where(
    watch: &mut etcd_client::WatchStream,
    wanted: impl Fn(&etcd_client::Event) -> bool,
) {
    loop {
        let answer = watch
            .message()
            .await
            .expect("watch answer")
            .expect("watch open");
        if answer.events().iter().any(&wanted) {
            return;
        }
    }
}

/// Waits until `key` exists (watching from before the check, so a creation is not missed).
pub async fn appears(client: &Client, key: &[u8]) {
    let mut watch = client.clone().watch(key, None).await.expect("watch");
    if exists(client, key).await {
        return;
    }
    next_event(&mut watch, etcd_client::EventType::Put).await;
}

/// Waits until `key` holds `value` (watching from before the check, so a write is not
/// missed).
pub async fn holds(client: &Client, key: &[u8], value: &[u8]) {
    let mut watch = client.clone().watch(key, None).await.expect("watch");
    let now = read(client, key, None).await;
    if now.kvs().first().is_some_and(|kv| kv.value() == value) {
        return;
    }
    let written = |event: &etcd_client::Event| event.kv().is_some_and(|kv| kv.value() == value);
    next_event_where(&mut watch, written).await;
}

/// One mebibyte.
pub const MIB: usize = 1024 * 1024;

/// Puts five values of 1 MiB under `prefix` (as [`put_many`]); returns the keys. Each is
/// under etcd's 1.5 MiB request limit, but together they are over the client's 4 MiB
/// answer limit: no read or failed commit can hand them back in one answer.
pub async fn put_five_mib(client: &Client, prefix: &str) -> Vec<String> {
    put_many(client, prefix, 5, &vec![b'v'; MIB]).await
}

/// Puts `value` under `count` keys `prefix/000`, `prefix/001`, ...; returns the keys.
pub async fn put_many(client: &Client, prefix: &str, count: usize, value: &[u8]) -> Vec<String> {
    let keys: Vec<String> = (0..count).map(|i| format!("{prefix}/{i:03}")).collect();
    for key in &keys {
        client
            .clone()
            .put(key.as_str(), value, None)
            .await
            .expect("put");
    }
    keys
}

/// An `etcdctl` process (v3 API), killed when dropped.
pub struct Etcdctl {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Etcdctl {
    pub fn spawn(endpoints: &[String], args: &[&str]) -> Etcdctl {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start etcdctl (scripts/install-deps installs it)");
        let stdout = child.stdout.take().expect("piped stdout");
        Etcdctl {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
        }
    }

    /// The next line it prints, or `None` once its output ends.
    pub async fn next_line(&mut self) -> Option<String> {
        self.lines.next_line().await.expect("read etcdctl output")
    }

    /// Asks it to stop as Ctrl-C would (it then closes its session), and waits for it, at
    /// most 10 s.
    pub async fn interrupt(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling our own, not yet reaped child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        }
        let exited = within(secs(10), self.child.wait()).await;
        exited.expect("wait for etcdctl");
    }
}

/// A client that reaches the one member of `cluster` two ways, through `proxy` and
/// directly: a request stalled in the proxy is sent again (with this crate's retries), and
/// the stalled attempt reaches etcd when the proxy heals. etcd-client's balancer sends each
/// attempt one way or the other at random, so a request fails only if all its attempts
/// take the stalled proxy: with a request timeout of [`TWO_PATH_REQUEST_TIMEOUT`] (30
/// attempts, one every 2 s), one time in 2^30 (with 20 s, one in 2^10). Bound calls made
/// while the proxy stalls with [`THROUGH_TWO_PATHS`].
pub async fn two_path_client(
    cluster: &etcd_concurrency::testing::EtcdCluster,
    proxy: &etcd_concurrency::testing::Proxy,
) -> Client {
    Client::connect([proxy.endpoint(), cluster.endpoint(0)], None)
        .await
        .unwrap()
}

/// The request timeout for calls through a [`two_path_client`].
pub const TWO_PATH_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A bound for a call through a [`two_path_client`] while its proxy stalls: the request
/// timeout and then some.
pub const THROUGH_TWO_PATHS: Duration = Duration::from_secs(70);

/// A session of a [`two_path_client`], with a 30 s TTL.
pub async fn two_path_session(
    cluster: &etcd_concurrency::testing::EtcdCluster,
    proxy: &etcd_concurrency::testing::Proxy,
) -> etcd_concurrency::Session {
    etcd_concurrency::Session::builder(two_path_client(cluster, proxy).await)
        .ttl(secs(30))
        .request_timeout(TWO_PATH_REQUEST_TIMEOUT)
        .build()
        .await
        .unwrap()
}

/// How many times [`a_late_join_leaves_no_key`] tries to get a join attempt to etcd after
/// the release. A try gets one only if the join's first attempt took the stalled proxy
/// (one time in two: the balancer) and, once the proxy heals, etcd applies that attempt
/// before the reset that cancelled it, queued right behind it (a bit more than one time
/// in two): 29 of 110 tries measured did, so all of 20 tries missed about one time in
/// 450 (0.74^20), and all of 50 miss about one time in four million. A try takes 2-8 s.
const LATE_JOIN_TRIES: usize = 50;

/// Takes a lock or leadership and releases it, with `take_and_release(session, name)`,
/// through a session that reaches etcd two ways while one of them, a proxy, stalls; until
/// a join attempt held in the proxy reaches etcd after the release (at most
/// [`LATE_JOIN_TRIES`] tries). `take_and_release` returns how long taking took: 1.9 s or
/// more means the join was sent again. Asserts that the key such a late attempt makes is
/// deleted.
pub async fn a_late_join_leaves_no_key(
    mut take_and_release: impl AsyncFnMut(&etcd_concurrency::Session, &str) -> Duration,
) {
    let cluster = etcd_concurrency::testing::EtcdCluster::start(1).await;
    let observer = cluster.client().await;
    let proxy = etcd_concurrency::testing::Proxy::start(&cluster.endpoint(0))
        .await
        .unwrap();
    let ours = two_path_session(&cluster, &proxy).await;
    for _ in 0..LATE_JOIN_TRIES {
        let name = unique("late-join");
        let key = format!("{name}/{:x}", ours.lease_id());
        let mut changes = observer.clone().watch(key.as_str(), None).await.unwrap();
        proxy.stall();
        let took = take_and_release(&ours, &name).await;
        if late_join_withdrawn(&mut changes, &proxy, took >= millis(1_900)).await {
            return;
        }
    }
    panic!("no join attempt reached etcd late in {LATE_JOIN_TRIES} tries");
}

/// The type of the next event on `changes`, within 30 s.
pub async fn next_change(changes: &mut etcd_client::WatchStream) -> etcd_client::EventType {
    loop {
        let answer = within(secs(30), changes.message()).await.unwrap().unwrap();
        if let Some(event) = answer.events().first() {
            return event.event_type();
        }
    }
}

/// After a join, and the unlock or resign of what it got, observed on `changes` while
/// the proxy stalled: heals the proxy and, if `sent_again`, returns whether the stalled
/// attempt made the key again, asserting that it was then deleted within 5 s.
async fn late_join_withdrawn(
    changes: &mut etcd_client::WatchStream,
    proxy: &etcd_concurrency::testing::Proxy,
    sent_again: bool,
) -> bool {
    use etcd_client::EventType;
    assert_eq!(next_change(changes).await, EventType::Put);
    assert_eq!(next_change(changes).await, EventType::Delete);
    // The attempt held in the proxy reaches etcd now, and makes the key again unless the
    // RST that cancelled it came first.
    proxy.heal();
    if !sent_again {
        return false;
    }
    let Ok(made) = tokio::time::timeout(secs(1), next_change(changes)).await else {
        return false;
    };
    assert_eq!(made, EventType::Put);
    assert_eq!(
        within(secs(5), next_change(changes)).await,
        EventType::Delete,
        "the key a late join attempt made was left"
    );
    true
}

/// How many watch streams the etcd member at `endpoint` (`http://host:port`) has open.
pub async fn watch_streams(endpoint: &str) -> u64 {
    metric(endpoint, "etcd_debugging_mvcc_watch_stream_total").await
}

/// Waits until the member at `endpoint` has applied more than `count` raft proposals.
pub async fn proposals_applied_exceed(endpoint: &str, count: u64) {
    while proposals_applied(endpoint).await <= count {
        tokio::time::sleep(millis(20)).await;
    }
}

/// How many raft proposals the etcd member at `endpoint` has applied.
pub async fn proposals_applied(endpoint: &str) -> u64 {
    metric(endpoint, "etcd_server_proposals_applied_total").await
}

/// How many bytes of raft messages the member at `endpoint` has received from the member
/// whose id is `from`.
pub async fn peer_bytes_received(endpoint: &str, from: u64) -> u64 {
    let name = format!("etcd_network_peer_received_bytes_total{{From=\"{from:x}\"}}");
    metric(endpoint, &name).await
}

/// The value of the metric `name` (with its labels, if any, as etcd writes them) on the
/// `/metrics` page of the etcd member at `endpoint` (`http://host:port`), read within 5 s.
async fn metric(endpoint: &str, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = endpoint.trim_start_matches("http://");
    let read = async {
        let mut connection = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n");
        connection
            .write_all(request.as_bytes())
            .await
            .expect("send");
        let mut page = String::new();
        connection.read_to_string(&mut page).await.expect("read");
        page
    };
    let page = within(secs(5), read).await;
    let line = page
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '));
    let value = line.unwrap_or_else(|| panic!("no metric {name}"));
    value.trim().parse::<f64>().expect("a number") as u64
}

/// How many watch events the member at `endpoint` has sent, over all its watchers.
pub async fn watch_events_sent(endpoint: &str) -> u64 {
    metric(endpoint, "etcd_debugging_mvcc_events_total").await
}

/// Waits until the member at `endpoint` has `count` watch streams open.
pub async fn watch_streams_become(endpoint: &str, count: u64) {
    while watch_streams(endpoint).await != count {
        tokio::time::sleep(millis(20)).await;
    }
}

/// What this crate logs on the calling thread, at debug level and up, from
/// [`DebugLog::capture`] until its guard is dropped (a current-thread runtime keeps every
/// task of a test on that thread).
///
/// One global subscriber takes every debug event of the crate and hands it to the
/// capture of the thread it was logged on, if any: a subscriber per thread would leave
/// events out whenever tracing's per-callsite cache was filled while no capture wanted
/// debug events (tests run in parallel in one process).
#[derive(Clone, Default)]
pub struct DebugLog(Arc<std::sync::Mutex<Vec<u8>>>);

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<DebugLog>> = const { std::cell::RefCell::new(None) };
}

/// Ends the calling thread's capture when dropped.
pub struct CaptureGuard;

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURE.with(|capture| capture.borrow_mut().take());
    }
}

impl DebugLog {
    pub fn capture() -> (DebugLog, CaptureGuard) {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter("etcd_concurrency=debug")
                .with_writer(|| ThreadCapture)
                .with_ansi(false)
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        });
        let log = DebugLog::default();
        CAPTURE.with(|capture| *capture.borrow_mut() = Some(log.clone()));
        (log, CaptureGuard)
    }

    /// How many lines logged so far contain `text`.
    pub fn lines_with(&self, text: &str) -> usize {
        let bytes = self.0.lock().unwrap();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|line| line.contains(text))
            .count()
    }
}

/// Writes an event to the calling thread's capture, or nowhere.
struct ThreadCapture;

impl std::io::Write for ThreadCapture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|capture| match capture.borrow_mut().as_mut() {
            Some(log) => log.write(bytes),
            None => Ok(bytes.len()),
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::io::Write for DebugLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
