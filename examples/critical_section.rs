//! Mutual exclusion between processes with a [`Mutex`], and writes fenced by the lock.
//!
//! The example starts `--workers` worker processes (it runs its own executable again with
//! a hidden `--worker` flag). Each takes the same lock `--rounds` times. Inside the
//! critical section it appends two entries to a shared record in etcd, `in` on entering
//! and `out` before leaving, each tagged with its worker id and fencing token. Every
//! append is a read-modify-write Txn fenced twice: by the lock
//! (`guard.ownership_compare()`, so a holder whose lease expired cannot write) and by the
//! record's mod revision (so a concurrent writer cannot be overwritten unnoticed).
//!
//! Afterwards the parent reads the record back from etcd and checks that every worker
//! finished, that there were workers × rounds critical sections, that no two recorded
//! sections (from `in` to `out`) overlapped, that the fencing tokens strictly increase,
//! and that the lock left no key behind.
//!
//! ```sh
//! cargo run --release --example critical_section
//! cargo run --release --example critical_section -- --workers 8 --rounds 20
//! cargo run --release --example critical_section -- --endpoints http://127.0.0.1:2379
//! ```
//!
//! Without `--endpoints` (or `ETCD_ENDPOINTS`) it starts a throwaway 3-member cluster.
//! It ends with a line beginning `OK` (exit code 0) or `FAILED` (exit code 1).

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use etcd_concurrency::{Mutex, MutexGuard, Session};
use tokio::process::Command;

use common::{Checks, EtcdArgs, REQUEST_LIMIT, Relayed, Result, Verdict, within};

/// The workers' lease TTL: a crashed worker's lock is released this long after its last
/// renewal.
const SESSION_TTL: Duration = Duration::from_secs(5);
/// How long a worker waits for the lock before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// How long a worker holds the lock at most between its two appends.
const MAX_HOLD: Duration = Duration::from_millis(10);

/// Workers in separate processes take one distributed lock in turn and append to a record
/// in etcd under it.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// How many worker processes
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// How many times each worker takes the lock
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
    /// Run as worker ID (set by the parent process)
    #[arg(long, hide = true, requires = "prefix")]
    worker: Option<u32>,
    /// The run's key prefix (set by the parent process)
    #[arg(long, hide = true)]
    prefix: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::init_tracing();
    let args = Args::parse();
    if let (Some(id), Some(prefix)) = (args.worker, &args.prefix) {
        return match run_worker(id, prefix, args.rounds, &args.etcd.endpoints).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                println!("error: {}", common::describe(&*error));
                ExitCode::FAILURE
            }
        };
    }
    if args.workers * args.rounds > MAX_SECTIONS {
        Args::command()
            .error(
                clap::error::ErrorKind::ValueValidation,
                format!(
                    "--workers × --rounds may be at most {MAX_SECTIONS}: the record of every \
                     section is one etcd value, rewritten whole by each append, and etcd keeps \
                     every version until compacted (about 30 × sections² bytes)"
                ),
            )
            .exit();
    }
    common::conclude(run_parent(args).await)
}

/// The most critical sections a run may have. Each section adds about 30 bytes to the
/// record, and each of its two appends writes the whole record anew; etcd keeps every
/// version until it is compacted, so a run leaves about 30 × sections² bytes of history
/// (measured: 29 MB for 1,000 sections). 2,000 sections leave about 120 MB; 8,500 would
/// fill etcd's default 2 GiB quota and raise its NOSPACE alarm, which refuses every write
/// to the cluster until an operator compacts, defragments and disarms it.
const MAX_SECTIONS: u32 = 2_000;

/// The lock's name; its holders' and waiters' keys are `<name>/<lease id>`.
fn lock_name(prefix: &str) -> String {
    format!("{prefix}/lock")
}

/// The key of the record every critical section appends to.
fn record_key(prefix: &str) -> String {
    format!("{prefix}/record")
}

async fn run_worker(id: u32, prefix: &str, rounds: u32, endpoints: &[String]) -> Result<()> {
    if endpoints.is_empty() {
        return Err("a worker needs --endpoints".into());
    }
    let client = common::connect(endpoints).await?;
    let session = within(
        REQUEST_LIMIT,
        "create a session",
        Session::builder(client.clone()).ttl(SESSION_TTL).build(),
    )
    .await?;
    println!(
        "session lease {:x}, TTL {:?}",
        session.lease_id(),
        session.ttl()
    );
    let mutex = Mutex::new(&session, lock_name(prefix));
    let record = record_key(prefix);
    for round in 1..=rounds {
        let guard = within(LOCK_WAIT, "take the lock", mutex.lock()).await?;
        let token = guard.fencing_token();
        println!("holds the lock (round {round}/{rounds}, fencing token {token})");
        append(&client, &guard, &record, &format!("{id}:{token}:in;")).await?;
        tokio::time::sleep(MAX_HOLD.mul_f64(rand::random())).await;
        append(&client, &guard, &record, &format!("{id}:{token}:out;")).await?;
        within(REQUEST_LIMIT, "unlock", guard.unlock()).await?;
    }
    within(REQUEST_LIMIT, "close the session", session.close()).await?;
    println!("done; session closed");
    Ok(())
}

/// Appends `entry` to the record with a Txn that commits only while `guard` holds the lock
/// and nobody has written the record since it was read. Under a working lock it always
/// commits; a refusal is reported as an error, never retried, so that the parent's count
/// shows it.
async fn append(client: &Client, guard: &MutexGuard, record: &str, entry: &str) -> Result<()> {
    let current = within(
        REQUEST_LIMIT,
        "read the record",
        client.clone().get(record, None),
    )
    .await?;
    let (mut value, mod_revision) = match current.kvs().first() {
        Some(kv) => (kv.value_str()?.to_owned(), kv.mod_revision()),
        None => (String::new(), 0), // not written yet: mod revision 0 compares as absent
    };
    value.push_str(entry);
    let fenced_append = Txn::new()
        .when([
            guard.ownership_compare(),
            Compare::mod_revision(record, CompareOp::Equal, mod_revision),
        ])
        .and_then([TxnOp::put(record, value, None)]);
    let answer = within(
        REQUEST_LIMIT,
        "append to the record",
        client.clone().txn(fenced_append),
    )
    .await?;
    if !answer.succeeded() {
        return Err(format!(
            "the fenced append of {entry:?} was refused: the lock was lost, or someone else \
             wrote the record while this worker held the lock"
        )
        .into());
    }
    Ok(())
}

async fn run_parent(args: Args) -> Result<Verdict> {
    let run = async |endpoints: &[String], client: &Client, prefix: &str| {
        run_workers(&args, endpoints, client, prefix).await
    };
    common::on_fresh_prefix(&args.etcd, "critical-section", run).await
}

/// Runs the worker processes and checks what they left in etcd.
async fn run_workers(
    args: &Args,
    endpoints: &[String],
    client: &Client,
    prefix: &str,
) -> Result<Verdict> {
    let (workers, rounds) = (args.workers, args.rounds);
    println!(
        "{workers} worker processes take the lock {} {rounds} times each",
        lock_name(prefix)
    );
    let executable = std::env::current_exe()?;
    let mut children = Vec::new();
    for id in 1..=workers {
        let mut command = Command::new(&executable);
        command
            .args(["--worker", &id.to_string(), "--prefix", prefix])
            .args(["--rounds", &rounds.to_string()])
            .args(["--endpoints", &endpoints.join(",")]);
        children.push(Relayed::spawn(command, &format!("[worker {id}] "))?);
    }
    // Each worker bounds its own waits; this bounds the whole run.
    let deadline = Instant::now() + LOCK_WAIT + Duration::from_millis(100) * workers * rounds;
    let mut failed_workers = Vec::new();
    for (id, child) in (1..).zip(children) {
        let left = deadline.saturating_duration_since(Instant::now());
        let (status, _) = child.wait(left).await?;
        if !status.success() {
            failed_workers.push(format!("worker {id} ({status})"));
        }
    }

    println!("checking the record and the lock in etcd:");
    let record = read_record(client, &record_key(prefix)).await?;
    let lock_keys = count_keys(client, &format!("{}/", lock_name(prefix))).await?;

    let mut checks = Checks::default();
    checks.check(
        failed_workers.is_empty(),
        if failed_workers.is_empty() {
            "every worker finished its rounds".to_owned()
        } else {
            format!("workers that failed: {}", failed_workers.join(", "))
        },
    );
    let sections = record.sections();
    let expected = workers * rounds;
    checks.check(
        sections
            .as_ref()
            .is_ok_and(|s| s.len() == expected as usize),
        format!(
            "critical sections recorded: {} (expected {workers} × {rounds} = {expected})",
            sections.as_ref().map_or(0, Vec::len)
        ),
    );
    // The record is in commit order, and each append was fenced by the lock and by the
    // record's previous mod revision. So if two workers ever held the lock at once, the
    // second one's `in` would sit between the first one's `in` and `out` (or an append
    // would have been refused, failing its worker). Mutual exclusion therefore shows as
    // a record made of adjacent (in, out) pairs of one worker and one token.
    checks.check(
        sections.is_ok(),
        match &sections {
            Ok(_) => "overlapping critical sections: 0 (every `in` is followed by its own `out`)"
                .to_owned(),
            Err(overlap) => format!("overlapping critical sections: {overlap}"),
        },
    );
    let sections = sections.unwrap_or_default();
    let tokens: Vec<i64> = sections.iter().map(|s| s.token).collect();
    checks.check(
        tokens.windows(2).all(|pair| pair[0] < pair[1]),
        format!(
            "fencing tokens strictly increase in append order ({} .. {})",
            tokens.first().unwrap_or(&0),
            tokens.last().unwrap_or(&0)
        ),
    );
    let mut per_worker = BTreeMap::new();
    for section in &sections {
        *per_worker.entry(section.worker).or_insert(0) += 1;
    }
    checks.check(
        per_worker.len() == workers as usize && per_worker.values().all(|&n| n == rounds),
        format!("critical sections per worker: {per_worker:?} (expected {rounds} each)"),
    );
    checks.check(
        lock_keys == 0,
        format!("keys left under {}/: {lock_keys}", lock_name(prefix)),
    );
    Ok(checks.verdict(format!(
        "{} acquisitions by {workers} processes, 0 overlaps, fencing tokens strictly \
         increasing, no lock keys left",
        sections.len()
    )))
}

/// The record as appended by the workers: `worker:token:in;worker:token:out;...`.
struct Record(String);

/// One critical section as the record shows it.
struct Section {
    worker: u32,
    token: i64,
}

impl Record {
    /// The critical sections in order, or a description of the first place where the
    /// record is not a sequence of (in, out) pairs of one worker and token.
    fn sections(&self) -> Result<Vec<Section>, String> {
        let entries: Vec<&str> = self.0.split_terminator(';').collect();
        let mut sections = Vec::new();
        for pair in entries.chunks(2) {
            let entered = pair[0];
            let left = pair.get(1).copied().unwrap_or("(nothing)");
            let Some((worker, token)) = entered.strip_suffix(":in").and_then(parse_holder) else {
                return Err(format!("expected an `in` entry, found {entered:?}"));
            };
            if left != format!("{worker}:{token}:out") {
                return Err(format!(
                    "worker {worker} (token {token}) entered, then came {left:?}"
                ));
            }
            sections.push(Section { worker, token });
        }
        Ok(sections)
    }
}

/// Parses `worker:token`.
fn parse_holder(text: &str) -> Option<(u32, i64)> {
    let (worker, token) = text.split_once(':')?;
    Some((worker.parse().ok()?, token.parse().ok()?))
}

async fn read_record(client: &Client, key: &str) -> Result<Record> {
    let answer = within(
        REQUEST_LIMIT,
        "read the record",
        client.clone().get(key, None),
    )
    .await?;
    let text = match answer.kvs().first() {
        Some(kv) => kv.value_str()?.to_owned(),
        None => String::new(),
    };
    Ok(Record(text))
}

async fn count_keys(client: &Client, prefix: &str) -> Result<i64> {
    let options = GetOptions::new().with_prefix().with_count_only();
    let answer = within(
        REQUEST_LIMIT,
        "count keys",
        client.clone().get(prefix, Some(options)),
    )
    .await?;
    Ok(answer.count())
}
