//! The benchmark runner of `shared/bench/SCENARIOS.md`: one scenario per run, one JSON
//! line on stdout with its figures, anything else on stderr.
//!
//! ```text
//! cargo bench --bench scenarios -- --scenario mutex-contended --clients 8 --duration 5s
//! cargo bench --bench scenarios -- --endpoints 10.0.0.1:2379,10.0.0.2:2379 --scenario stm-transfer
//! ```
//!
//! `--impl etcd-client-rpc` measures etcd-client's own calls to etcd's server-side Lock
//! and Election services (with a kept-alive lease) for `mutex-uncontended`,
//! `mutex-contended` and `election-handoff`: what a Rust user would pick without this
//! crate. `--read-cache` gives each `stm-transfer` client a `ReadCache` of the accounts.
//! For a cluster with TLS, `--cacert`, `--cert` and `--key` take etcdctl's PEM files:
//!
//! ```text
//! cargo bench --bench scenarios -- --endpoints https://10.0.0.1:2379 \
//!     --cacert ca.pem --cert client.pem --key client-key.pem
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use common::{REQUEST_LIMIT, describe, within};
use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, LeaderKey, LockOptions,
    ResignOptions, TlsOptions,
};
use etcd_concurrency::{Election, Error, Isolation, Leadership, Mutex, ReadCache, Session, Stm};
use rand::Rng;
use serde_json::{Value, json};

#[path = "../examples/common/mod.rs"]
mod common;

/// Runs one benchmark scenario against etcd and prints its figures as one JSON line.
#[derive(Parser, Debug)]
struct Args {
    /// Comma-separated etcd endpoints.
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    endpoints: Vec<String>,
    #[arg(long, value_enum, default_value_t = Scenario::MutexUncontended)]
    scenario: Scenario,
    /// Iterations for mutex-uncontended and election-handoff.
    #[arg(long, default_value_t = 300, value_parser = at_least_one)]
    iterations: usize,
    /// Concurrent clients, each with its own connection and session.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    clients: usize,
    /// Measured run time for mutex-contended and stm-transfer (Go syntax: 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = go_duration)]
    duration: Duration,
    /// Accounts for stm-transfer (at least 2: a transfer needs two distinct accounts).
    #[arg(long, default_value_t = 16, value_parser = at_least_two)]
    accounts: usize,
    #[arg(long, value_enum, default_value_t = IsolationLevel::SerializableSnapshot)]
    isolation: IsolationLevel,
    /// Key prefix for the run (default, or empty: a fresh random one, as Go's anchor).
    #[arg(long)]
    prefix: Option<String>,
    /// The implementation measured.
    #[arg(long = "impl", value_enum, default_value_t = Implementation::EtcdConcurrency)]
    implementation: Implementation,
    /// stm-transfer: each client's `Stm` reads the accounts from its own `ReadCache` of
    /// their prefix (reported as `etcd-concurrency-read-cache`).
    #[arg(long)]
    read_cache: bool,
    /// For a cluster with authentication on: `NAME:PASSWORD`, as etcdctl's `--user`
    /// (the user needs read and write access to the prefix).
    #[arg(long, value_parser = name_and_password)]
    user: Option<(String, String)>,
    /// For a cluster serving TLS (`https://` endpoints): the PEM file of the certificate
    /// authority that signed its certificates, as etcdctl's `--cacert`.
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// For a cluster that asks clients for a certificate: this client's, in PEM, as
    /// etcdctl's `--cert`.
    #[arg(long, requires_all = ["key", "cacert"])]
    cert: Option<PathBuf>,
    /// The private key of `--cert`, in PEM, as etcdctl's `--key`.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Scenario {
    MutexUncontended,
    MutexContended,
    ElectionHandoff,
    StmTransfer,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum IsolationLevel {
    SerializableSnapshot,
    Serializable,
    RepeatableReads,
    ReadCommitted,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Implementation {
    /// This crate.
    EtcdConcurrency,
    /// etcd-client's calls to etcd's server-side Lock and Election services.
    EtcdClientRpc,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// The sessions' TTL, as in the Go anchor.
const TTL: Duration = Duration::from_secs(10);
/// The parser of `--user`: the name, then the password after the first colon.
fn name_and_password(text: &str) -> Result<(String, String), String> {
    match text.split_once(':') {
        Some((name, password)) if !name.is_empty() => Ok((name.into(), password.into())),
        _ => Err("expected NAME:PASSWORD".into()),
    }
}

/// The parser of `--duration`: Go's units only (so `1M`, a month to humantime, is refused
/// where Go would refuse it, not taken for Go's `1m`), and more than zero.
fn go_duration(text: &str) -> Result<Duration, String> {
    const GO_UNITS: [&str; 7] = ["ns", "us", "µs", "ms", "s", "m", "h"];
    let mut units = text.split(|c: char| c.is_ascii_digit() || c == '.');
    if let Some(unit) = units.find(|u| !u.is_empty() && !GO_UNITS.contains(u)) {
        return Err(format!("unknown unit {unit:?}: use ns, us, ms, s, m or h"));
    }
    if text.ends_with(|c: char| c.is_ascii_digit() || c == '.') {
        return Err("a unit is needed, as in 5s or 500ms".into());
    }
    match humantime::parse_duration(text).map_err(|e| e.to_string())? {
        Duration::ZERO => Err("a run of zero time measures nothing".into()),
        duration => Ok(duration),
    }
}

/// The parser of `--iterations` and `--clients`: none would measure nothing.
fn at_least_one(text: &str) -> Result<usize, String> {
    at_least(1, text, "a run of none measures nothing")
}

/// The parser of `--accounts`: a transfer needs two distinct accounts.
fn at_least_two(text: &str) -> Result<usize, String> {
    at_least(2, text, "a transfer needs 2 distinct accounts")
}

/// `text` as a number no less than `min`; `why` says why fewer will not do.
fn at_least(min: usize, text: &str, why: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        Ok(n) => Err(format!("{n} is too few: {why}")),
        Err(e) => Err(e.to_string()),
    }
}

/// One thread: the clients wait on etcd, not on CPU, and a single-threaded runtime saves
/// a cross-thread wake-up per request (measured: 0.1 ms per lock+unlock pair on two cores).
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let prefix = match &args.prefix {
        Some(prefix) if !prefix.is_empty() => prefix.clone(),
        // An empty prefix would be the whole keyspace, whose accounts/ the STM run deletes.
        _ => format!("/bench/{:016x}/", rand::random::<u64>()),
    };
    let figures = match (args.scenario, args.implementation) {
        (Scenario::StmTransfer, Implementation::EtcdClientRpc) => {
            Err("etcd-client-rpc has no STM; only the lock and election scenarios".into())
        }
        (Scenario::MutexUncontended, which) => mutex_uncontended(&args, &prefix, which).await,
        (Scenario::MutexContended, which) => mutex_contended(&args, &prefix, which).await,
        (Scenario::ElectionHandoff, which) => election_handoff(&args, &prefix, which).await,
        (Scenario::StmTransfer, _) => stm_transfer(&args, &prefix).await,
    };
    match figures {
        Ok(mut figures) => {
            // The cache is used by STM only: the other scenarios run without it.
            let cached = args.read_cache && matches!(args.scenario, Scenario::StmTransfer);
            let name = match (args.implementation, cached) {
                (Implementation::EtcdConcurrency, false) => "etcd-concurrency",
                (Implementation::EtcdConcurrency, true) => "etcd-concurrency-read-cache",
                (Implementation::EtcdClientRpc, _) => "etcd-client-rpc",
            };
            figures["impl"] = json!(name);
            figures["scenario"] = args
                .scenario
                .to_possible_value()
                .map(|v| v.get_name().to_owned())
                .into();
            println!("{figures}");
        }
        Err(failure) => {
            eprintln!("scenarios: {}", describe(&*failure));
            std::process::exit(1);
        }
    }
}

async fn connect(args: &Args) -> Result<Client, Failure> {
    let mut options = ConnectOptions::new();
    if let Some((name, password)) = &args.user {
        options = options.with_user(name.as_str(), password.as_str());
    }
    if let Some(tls) = tls_options(args)? {
        options = options.with_tls(tls);
    }
    common::connect_with(&args.endpoints, options).await
}

/// The TLS settings of `--cacert`, `--cert` and `--key`, if any.
fn tls_options(args: &Args) -> Result<Option<TlsOptions>, Failure> {
    let Some(cacert) = &args.cacert else {
        if args.endpoints.iter().any(|e| e.starts_with("https://")) {
            let why = "https:// endpoints need --cacert: the PEM file of the certificate \
                       authority that signed the cluster's certificates";
            return Err(why.into());
        }
        return Ok(None);
    };
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(pem(cacert)?));
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        tls = tls.identity(Identity::from_pem(pem(cert)?, pem(key)?));
    }
    Ok(Some(tls))
}

/// The contents of a PEM file, or an error naming it.
fn pem(path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()).into())
}

async fn session(client: &Client) -> Result<Session, Failure> {
    Ok(Session::builder(client.clone()).ttl(TTL).build().await?)
}

/// A lock held through one of the two implementations.
enum Locker {
    Ours { mutex: Mutex, session: Session },
    Service { session: Session, name: String },
}

enum Held {
    Ours(etcd_concurrency::MutexGuard),
    Service(Vec<u8>),
}

impl Locker {
    async fn new(args: &Args, name: String, which: Implementation) -> Result<Locker, Failure> {
        let session = session(&connect(args).await?).await?;
        Ok(match which {
            Implementation::EtcdConcurrency => Locker::Ours {
                mutex: Mutex::new(&session, name),
                session,
            },
            Implementation::EtcdClientRpc => Locker::Service { session, name },
        })
    }

    async fn lock(&mut self) -> Result<Held, Failure> {
        Ok(match self {
            Locker::Ours { mutex, .. } => Held::Ours(mutex.lock().await?),
            Locker::Service { session, name } => {
                let options = LockOptions::new().with_lease(session.lease_id());
                let mut client = session.client().clone();
                let answer = client.lock(name.as_str(), Some(options)).await?;
                Held::Service(answer.key().to_vec())
            }
        })
    }

    async fn unlock(&mut self, held: Held) -> Result<(), Failure> {
        match (self, held) {
            (_, Held::Ours(guard)) => guard.unlock().await?,
            (Locker::Service { session, .. }, Held::Service(key)) => {
                session.client().clone().unlock(key).await?;
            }
            (Locker::Ours { .. }, Held::Service(_)) => {
                unreachable!("a lock is held as it was taken")
            }
        }
        Ok(())
    }

    /// Closes the session: its lease (and any key on it) is revoked now, not at expiry.
    async fn close(self) -> Result<(), Failure> {
        let (Locker::Ours { session, .. } | Locker::Service { session, .. }) = self;
        within(REQUEST_LIMIT, "close a session", session.close()).await
    }
}

async fn mutex_uncontended(
    args: &Args,
    prefix: &str,
    which: Implementation,
) -> Result<Value, Failure> {
    let mut locker = Locker::new(args, format!("{prefix}lock"), which).await?;
    let mut latencies = Vec::with_capacity(args.iterations);
    let started = Instant::now();
    for _ in 0..args.iterations {
        let t = Instant::now();
        let held = locker.lock().await?;
        locker.unlock(held).await?;
        latencies.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    locker.close().await?;
    let (p50, p99) = percentiles(&mut latencies);
    Ok(json!({
        "ops_per_s": args.iterations as f64 / elapsed.as_secs_f64(),
        "p50_ms": p50, "p99_ms": p99, "iterations": args.iterations,
    }))
}

async fn mutex_contended(
    args: &Args,
    prefix: &str,
    which: Implementation,
) -> Result<Value, Failure> {
    let holders = Arc::new(AtomicI64::new(0));
    let violations = Arc::new(AtomicU64::new(0));
    let mut lockers = Vec::new();
    for _ in 0..args.clients {
        lockers.push(Locker::new(args, format!("{prefix}lock"), which).await?);
    }
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut workers = Vec::new();
    for mut locker in lockers {
        let (holders, violations) = (holders.clone(), violations.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let held = locker.lock().await?;
                latencies.push(t.elapsed());
                if holders.fetch_add(1, Ordering::SeqCst) != 0 {
                    violations.fetch_add(1, Ordering::SeqCst);
                }
                // Let the other workers run while this one holds the lock (one thread):
                // one that wrongly believed it held the lock too would count a violation.
                tokio::task::yield_now().await;
                holders.fetch_sub(1, Ordering::SeqCst);
                locker.unlock(held).await?;
            }
            Ok::<_, Failure>((latencies, locker))
        }));
    }
    let mut latencies = Vec::new();
    let mut lockers = Vec::new();
    for worker in workers {
        let (worker_latencies, locker) = worker.await??;
        latencies.extend(worker_latencies);
        lockers.push(locker);
    }
    let elapsed = started.elapsed();
    for locker in lockers {
        locker.close().await?;
    }
    let acquisitions = latencies.len();
    let (p50, p99) = percentiles(&mut latencies);
    Ok(json!({
        "ops_per_s": acquisitions as f64 / elapsed.as_secs_f64(),
        "p50_ms": p50, "p99_ms": p99, "clients": args.clients,
        "acquisitions": acquisitions, "violations": violations.load(Ordering::SeqCst),
    }))
}

/// A candidate in one of the two implementations.
enum Candidate {
    Ours {
        election: Election,
        session: Session,
    },
    Service {
        session: Session,
        name: String,
    },
}

enum Leading {
    Ours(Leadership),
    Service(LeaderKey),
}

impl Candidate {
    async fn new(args: &Args, name: String, which: Implementation) -> Result<Candidate, Failure> {
        let session = session(&connect(args).await?).await?;
        Ok(match which {
            Implementation::EtcdConcurrency => Candidate::Ours {
                election: Election::new(&session, name),
                session,
            },
            Implementation::EtcdClientRpc => Candidate::Service { session, name },
        })
    }

    async fn campaign(&self, value: &str) -> Result<Leading, Failure> {
        Ok(match self {
            Candidate::Ours { election, .. } => Leading::Ours(election.campaign(value).await?),
            Candidate::Service { session, name } => {
                let mut client = session.client().clone();
                let answer = client
                    .campaign(name.as_str(), value, session.lease_id())
                    .await?;
                Leading::Service(
                    answer
                        .leader()
                        .cloned()
                        .ok_or("campaign answered no leader key")?,
                )
            }
        })
    }

    async fn resign(&self, leading: Leading) -> Result<(), Failure> {
        match (self, leading) {
            (_, Leading::Ours(leadership)) => leadership.resign().await?,
            (Candidate::Service { session, .. }, Leading::Service(key)) => {
                let options = ResignOptions::new().with_leader(key);
                session.client().clone().resign(Some(options)).await?;
            }
            (Candidate::Ours { .. }, Leading::Service(_)) => {
                unreachable!("leadership is given up as it was won")
            }
        }
        Ok(())
    }

    /// Closes the session: its lease is revoked now, not at expiry.
    async fn close(self) -> Result<(), Failure> {
        let (Candidate::Ours { session, .. } | Candidate::Service { session, .. }) = self;
        within(REQUEST_LIMIT, "close a session", session.close()).await
    }
}

async fn election_handoff(
    args: &Args,
    prefix: &str,
    which: Implementation,
) -> Result<Value, Failure> {
    let name = format!("{prefix}election");
    let mut leader = Arc::new(Candidate::new(args, name.clone(), which).await?);
    let mut follower = Arc::new(Candidate::new(args, name.clone(), which).await?);
    let mut counter = connect(args).await?;
    let mut leading = leader.campaign("a").await?;
    let mut latencies = Vec::with_capacity(args.iterations);
    for _ in 0..args.iterations {
        let candidate = follower.clone();
        let won = tokio::spawn(async move { candidate.campaign("f").await });
        // Time the hand-off only: wait until the follower's key is in the queue.
        let count = GetOptions::new().with_prefix().with_count_only();
        let queued = async {
            while counter
                .get(format!("{name}/"), Some(count.clone()))
                .await?
                .count()
                != 2
            {
                if won.is_finished() {
                    break; // it failed (or won without queueing): its answer tells
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok::<_, etcd_client::Error>(())
        };
        within(
            REQUEST_LIMIT,
            "wait for the follower's campaign to queue",
            queued,
        )
        .await?;
        let t = Instant::now();
        leader.resign(leading).await?;
        leading = won.await??;
        latencies.push(t.elapsed());
        std::mem::swap(&mut leader, &mut follower);
    }
    leader.resign(leading).await?;
    for candidate in [leader, follower] {
        Arc::into_inner(candidate)
            .ok_or("a candidate is still in use")?
            .close()
            .await?;
    }
    let (p50, p99) = percentiles(&mut latencies);
    Ok(json!({ "p50_ms": p50, "p99_ms": p99, "iterations": args.iterations }))
}

/// Runs [`transfers`] on accounts under `{prefix}accounts/`, deleting them afterwards
/// whether it succeeded, failed or was stopped by Ctrl-C or SIGTERM (the accounts have no
/// lease to expire with, as the lock and election keys do).
async fn stm_transfer(args: &Args, prefix: &str) -> Result<Value, Failure> {
    let mut setup = connect(args).await?;
    let accounts_prefix = format!("{prefix}accounts/");
    let every_account = || Some(etcd_client::DeleteOptions::new().with_prefix());
    // Accounts left under this prefix by an earlier run would spoil `conserved`.
    within(
        REQUEST_LIMIT,
        "delete old accounts",
        setup.delete(accounts_prefix.as_str(), every_account()),
    )
    .await?;
    let stopped = common::StopSignal::listen();
    let figures = tokio::select! {
        figures = transfers(args, &accounts_prefix, &mut setup) => figures,
        signal = stopped => Err(format!("{signal}: the run was stopped").into()),
    };
    let deleted = within(
        REQUEST_LIMIT,
        "delete the accounts",
        setup.delete(accounts_prefix.as_str(), every_account()),
    )
    .await;
    let figures = figures?;
    deleted?;
    Ok(figures)
}

/// Opens the accounts under `accounts_prefix` and runs the transfers, through `setup` and
/// one connection per client.
async fn transfers(
    args: &Args,
    accounts_prefix: &str,
    setup: &mut Client,
) -> Result<Value, Failure> {
    const OPENING_BALANCE: u64 = 1000;
    let accounts: Arc<Vec<String>> = Arc::new(
        (0..args.accounts)
            .map(|i| format!("{accounts_prefix}{i:04}"))
            .collect(),
    );
    for account in accounts.iter() {
        within(
            REQUEST_LIMIT,
            "set up the accounts",
            setup.put(account.as_str(), OPENING_BALANCE.to_string(), None),
        )
        .await?;
    }
    let isolation = match args.isolation {
        IsolationLevel::SerializableSnapshot => Isolation::SerializableSnapshot,
        IsolationLevel::Serializable => Isolation::Serializable,
        IsolationLevel::RepeatableReads => Isolation::RepeatableReads,
        IsolationLevel::ReadCommitted => Isolation::ReadCommitted,
    };
    let attempts = Arc::new(AtomicU64::new(0));
    let mut stms = Vec::new();
    for _ in 0..args.clients {
        let client = connect(args).await?;
        // etcd-client connects on its first request: make it before the clock starts.
        let mut first = client.clone();
        let read = first.get(accounts[0].as_str(), None);
        within(REQUEST_LIMIT, "connect a client", read).await?;
        // Go's STM retries a transaction for as long as it conflicts: so does this one.
        let mut stm = Stm::new(client.clone())
            .isolation(isolation)
            .max_attempts(u32::MAX);
        if args.read_cache {
            stm = stm.read_cache(ReadCache::watch(client, accounts_prefix).await?);
        }
        stms.push(stm);
    }
    let started = Instant::now();
    let deadline = started + args.duration;
    // Dropped with this future (the run stopped), the set aborts the workers.
    let mut workers = tokio::task::JoinSet::new();
    for stm in stms {
        let (accounts, attempts) = (accounts.clone(), attempts.clone());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let (from, to) = two_accounts(accounts.len());
                let (from, to) = (accounts[from].clone(), accounts[to].clone());
                let attempts = attempts.clone();
                let t = Instant::now();
                stm.run(async move |tx| {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let from_balance = balance(tx.get(&from).await?);
                    let to_balance = balance(tx.get(&to).await?);
                    let amount = from_balance / 4;
                    tx.put(from.as_str(), (from_balance - amount).to_string());
                    tx.put(to.as_str(), (to_balance + amount).to_string());
                    Ok::<_, Error>(())
                })
                .await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, Failure>(latencies)
        });
    }
    // Each worker stops by the deadline: all have ended before the accounts are read (and
    // deleted), even if one failed.
    let outcomes = workers.join_all().await;
    let elapsed = started.elapsed();
    let mut latencies = Vec::new();
    for outcome in outcomes {
        latencies.extend(outcome?);
    }
    let commits = latencies.len();
    let all = within(
        REQUEST_LIMIT,
        "read the accounts",
        setup.get(accounts_prefix, Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let total: u64 = all
        .kvs()
        .iter()
        .map(|kv| balance(Some(kv.value().to_vec())))
        .sum();
    let (p50, p99) = percentiles(&mut latencies);
    Ok(json!({
        "ops_per_s": commits as f64 / elapsed.as_secs_f64(),
        "p50_ms": p50, "p99_ms": p99, "clients": args.clients, "accounts": args.accounts,
        "isolation": args.isolation.to_possible_value().map(|v| v.get_name().to_owned()),
        "commits": commits,
        "attempts_per_commit": attempts.load(Ordering::Relaxed) as f64 / commits.max(1) as f64,
        "conserved": total == OPENING_BALANCE * args.accounts as u64,
    }))
}

/// Two distinct random account indices below `count`.
fn two_accounts(count: usize) -> (usize, usize) {
    let mut rng = rand::rng();
    let from = rng.random_range(0..count);
    let to = rng.random_range(0..count - 1);
    (from, if to >= from { to + 1 } else { to })
}

fn balance(value: Option<Vec<u8>>) -> u64 {
    value
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The 50th and 99th percentiles, in milliseconds.
fn percentiles(latencies: &mut [Duration]) -> (f64, f64) {
    if latencies.is_empty() {
        return (0.0, 0.0);
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: usize| latencies[(latencies.len() * q / 100).min(latencies.len() - 1)];
    (ms(at(50)), ms(at(99)))
}
