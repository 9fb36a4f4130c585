//! Leader election with failover: a job that only the leader runs, fenced by its
//! leadership.
//!
//! The example starts three candidate processes and one observer process (it runs its own
//! executable again with hidden flags). The candidates campaign in one [`Election`] with
//! sessions of TTL 2 s. The leader runs a job: every 100 ms it writes a heartbeat key, in a
//! Txn fenced by `leadership.ownership_compare()`, and it stops the job as soon as its
//! leadership is lost (`leadership.while_leading(job)`). The observer prints every change
//! of leader from `Election::observe()`.
//!
//! After the first leader has run its job for `--lead-for` (2 s), the example kills it with
//! SIGKILL, as a crash: nothing resigns, the leader's lease simply stops being renewed and
//! etcd expires it within its TTL. The next candidate takes over, and the example prints
//! the time from the kill to the new leader being observed. After the second leader has
//! run for `--lead-for`, the example stops it with SIGSTOP for longer than its TTL, as a
//! long GC pause or a frozen VM would: its lease expires and the last candidate takes
//! over, while the paused process still believes it leads. Resumed with SIGCONT, it must
//! find out on its own (its session is lost, or its next heartbeat is refused by the
//! fence), stop its job and exit. After the third leader has run for `--lead-for`,
//! everything stops cleanly (SIGTERM: the leader resigns).
//!
//! The verdict checks the heartbeat history in etcd: at most one process ran the job at
//! any moment (in revision order, the fencing tokens never go back to an older leader's,
//! and each token belongs to one candidate), so no heartbeat of the paused leader
//! committed after its successor's; the paused leader stopped on its own once resumed;
//! and the failover after the kill took at least the TTL left after the last renewal and
//! at most TTL + 2 s.
//!
//! ```sh
//! cargo run --release --example leader_job
//! cargo run --release --example leader_job -- --endpoints http://127.0.0.1:2379
//! ```
//!
//! Without `--endpoints` (or `ETCD_ENDPOINTS`) it starts a throwaway 3-member cluster.
//! It ends with a line beginning `OK` (exit code 0) or `FAILED` (exit code 1).

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::pin::pin;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use etcd_client::{Client, GetOptions, SortOrder, SortTarget, Txn, TxnOp};
use etcd_concurrency::{Election, Leader, Leadership, Observe, Session};
use futures::StreamExt;
use tokio::process::Command;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use common::{Checks, EtcdArgs, REQUEST_LIMIT, Relayed, Result, Verdict, within};

/// The candidates' lease TTL: a crashed leader is replaced this long after its last renewal.
const CANDIDATE_TTL: Duration = Duration::from_secs(2);
/// The lease TTL of observers' sessions, whose lease holds no key.
const OBSERVER_TTL: Duration = Duration::from_secs(5);
/// The longest acceptable failover: the TTL, plus time for etcd to expire the lease and for
/// the next leader to be told and observed.
const FAILOVER_LIMIT: Duration = Duration::from_secs(4);
/// The shortest: the crashed leader's lease, renewed every third of its TTL, had at least
/// two thirds of it left, less a renewal's round trip; a faster failover would mean the
/// next leader did not wait for it to expire.
const FAILOVER_FLOOR: Duration = Duration::from_secs(1);
/// How often the leader's job writes a heartbeat.
const HEARTBEAT_PERIOD: Duration = Duration::from_millis(100);
/// Nothing in the example runs longer than this; child processes give up after it.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// The longest `--lead-for`: three leaders' runs, two failovers and the stops fit in
/// [`RUN_LIMIT`].
const LEAD_FOR_LIMIT: Duration = Duration::from_secs(15);
/// How long the second leader is paused: past its TTL, so that its lease expires.
const PAUSE: Duration = Duration::from_millis(3500);
/// How long a child may take to stop after SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(5);
/// How long the paused leader may take, once resumed, to find its leadership lost, stop
/// its job and exit.
const RESUME_LIMIT: Duration = Duration::from_secs(15);
const CANDIDATES: [&str; 3] = ["candidate-1", "candidate-2", "candidate-3"];

/// Three processes campaign to run a job; the leader is killed and another takes over.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// How long each of the three leaders runs its job (e.g. 2s, 1500ms; at most 15s)
    #[arg(long, default_value = "2s", value_parser = lead_for)]
    lead_for: Duration,
    /// Run as the candidate NAME (set by the parent process)
    #[arg(long, hide = true, requires = "prefix")]
    candidate: Option<String>,
    /// Run as the observer (set by the parent process)
    #[arg(long, hide = true, requires = "prefix")]
    observer: bool,
    /// The run's key prefix (set by the parent process)
    #[arg(long, hide = true)]
    prefix: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::init_tracing();
    let args = Args::parse();
    let child = match (&args.candidate, args.observer, &args.prefix) {
        (Some(name), _, Some(prefix)) => {
            Some(run_candidate(name, prefix, &args.etcd.endpoints).await)
        }
        (None, true, Some(prefix)) => Some(run_observer(prefix, &args.etcd.endpoints).await),
        _ => None,
    };
    match child {
        Some(Ok(())) => ExitCode::SUCCESS,
        Some(Err(error)) => {
            println!("error: {}", common::describe(&*error));
            ExitCode::FAILURE
        }
        None => common::conclude(run_parent(args).await),
    }
}

/// Parses `--lead-for`: a duration up to [`LEAD_FOR_LIMIT`].
fn lead_for(text: &str) -> std::result::Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if duration > LEAD_FOR_LIMIT {
        return Err(format!(
            "at most {LEAD_FOR_LIMIT:?}, so that the run fits in {RUN_LIMIT:?}"
        ));
    }
    Ok(duration)
}

/// The election's name; candidates' keys are `<name>/<lease id>`.
fn election_name(prefix: &str) -> String {
    format!("{prefix}/election")
}

/// The prefix of the heartbeat keys: one key per heartbeat.
fn beats_prefix(prefix: &str) -> String {
    format!("{prefix}/beats/")
}

async fn run_candidate(name: &str, prefix: &str, endpoints: &[String]) -> Result<()> {
    let client = common::connect(endpoints).await?;
    let session = within(
        REQUEST_LIMIT,
        "create a session",
        Session::builder(client.clone()).ttl(CANDIDATE_TTL).build(),
    )
    .await?;
    let election = Election::new(&session, election_name(prefix));
    let mut terminate = signal(SignalKind::terminate())?;
    println!(
        "campaigning (lease {:x}, TTL {:?})",
        session.lease_id(),
        session.ttl()
    );
    let leadership = tokio::select! {
        won = within(RUN_LIMIT, "win the election", election.campaign(name)) => won?,
        _ = terminate.recv() => {
            // Dropping the campaign withdraws the candidacy: its key is deleted in the
            // background. Wait for that before closing, so the process does not exit
            // while the deletion is in flight.
            let key = format!("{}/{:x}", election_name(prefix), session.lease_id());
            within(REQUEST_LIMIT, "withdraw", until_deleted(&client, &key)).await?;
            within(REQUEST_LIMIT, "close the session", session.close()).await?;
            println!("SIGTERM while campaigning: withdrew the candidacy and closed the session");
            return Ok(());
        }
    };
    println!(
        "elected: leading with fencing token {}; starting the job",
        leadership.fencing_token()
    );
    let job = heartbeat_job(&client, &leadership, name, prefix);
    let ended = tokio::select! {
        finished = leadership.while_leading(job) => match finished {
            None => LEADERSHIP_LOST,
            Some(Err(error)) => return Err(error),
            Some(Ok(JobEnd::Fenced)) => FENCED,
            Some(Ok(JobEnd::TimeLimit)) => "the job reached its time limit",
        },
        _ = terminate.recv() => "SIGTERM: the job was stopped",
    };
    println!("{ended}");
    match within(REQUEST_LIMIT, "resign", leadership.resign()).await {
        Ok(()) => println!("resigned"),
        Err(error) => println!("could not resign: {}", common::describe(&*error)),
    }
    within(REQUEST_LIMIT, "close the session", session.close()).await?;
    println!("done: {ended}");
    Ok(())
}

/// How a leader's run ends when `while_leading` sees its session lost or its key gone.
const LEADERSHIP_LOST: &str = "leadership lost: the job was stopped";
/// How it ends when the fence refuses a heartbeat first.
const FENCED: &str = "leadership lost: a heartbeat was refused by its fence; the job stopped";

/// Why the heartbeat job ended by itself.
enum JobEnd {
    TimeLimit,
    /// A heartbeat was refused by its fence: the leadership is over.
    Fenced,
}

/// Returns once `key` does not exist.
async fn until_deleted(client: &Client, key: &str) -> Result<()> {
    while client.clone().get(key, None).await?.count() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The leader's job: a heartbeat every 100 ms, each to its own key and fenced by the
/// leadership, so that a deposed leader's heartbeat can never be written. Ends after
/// [`RUN_LIMIT`], or as soon as a heartbeat is refused.
async fn heartbeat_job(
    client: &Client,
    leadership: &Leadership,
    name: &str,
    prefix: &str,
) -> Result<JobEnd> {
    let token = leadership.fencing_token();
    let started = Instant::now();
    let mut ticks = tokio::time::interval(HEARTBEAT_PERIOD);
    for beat in 1.. {
        ticks.tick().await;
        if started.elapsed() > RUN_LIMIT {
            break;
        }
        let key = format!("{}{name}-{token}-{beat:06}", beats_prefix(prefix));
        let fenced_beat = Txn::new()
            .when([leadership.ownership_compare()])
            .and_then([TxnOp::put(key, format!("{name} {token}"), None)]);
        let answer = within(
            REQUEST_LIMIT,
            "write a heartbeat",
            client.clone().txn(fenced_beat),
        )
        .await?;
        if !answer.succeeded() {
            return Ok(JobEnd::Fenced);
        }
        if beat % 10 == 0 {
            println!("job: {beat} heartbeats written (fencing token {token})");
        }
    }
    Ok(JobEnd::TimeLimit)
}

async fn run_observer(prefix: &str, endpoints: &[String]) -> Result<()> {
    let client = common::connect(endpoints).await?;
    // Observing only reads, but an `Election` handle is made from a session.
    let session = Session::builder(client).ttl(OBSERVER_TTL).build();
    let session = within(REQUEST_LIMIT, "create a session", session).await?;
    let election = Election::new(&session, election_name(prefix));
    let mut leaders = election.observe();
    let mut terminate = signal(SignalKind::terminate())?;
    let deadline = tokio::time::sleep(RUN_LIMIT);
    let mut deadline = pin!(deadline);
    loop {
        tokio::select! {
            change = leaders.next() => match change {
                Some(Ok(Some(leader))) => println!("leader: {}", describe_leader(&leader)),
                Some(Ok(None)) => println!("nobody leads"),
                Some(Err(error)) => println!("observe failed, retrying: {}", common::describe(&error)),
                None => break,
            },
            _ = terminate.recv() => break,
            () = &mut deadline => break,
        }
    }
    within(REQUEST_LIMIT, "close the session", session.close()).await?;
    println!("stopped observing");
    Ok(())
}

fn describe_leader(leader: &Leader) -> String {
    format!(
        "{} (fencing token {}, lease {:x})",
        String::from_utf8_lossy(leader.value()),
        leader.create_revision(),
        leader.lease_id()
    )
}

async fn run_parent(args: Args) -> Result<Verdict> {
    let run = async |endpoints: &[String], client: &Client, prefix: &str| {
        run_candidates(&args, endpoints, client, prefix).await
    };
    common::on_fresh_prefix(&args.etcd, "leader-job", run).await
}

/// Runs the candidates and the observer through a crash and a pause, and checks the
/// heartbeats they left in etcd.
async fn run_candidates(
    args: &Args,
    endpoints: &[String],
    client: &Client,
    prefix: &str,
) -> Result<Verdict> {
    // The parent observes too, to know whom to kill and when the next leader took over.
    let session = Session::builder(client.clone()).ttl(OBSERVER_TTL).build();
    let session = within(REQUEST_LIMIT, "create a session", session).await?;
    let election = Election::new(&session, election_name(prefix));
    let mut leaders = election.observe();

    println!("three candidates campaign in {}", election_name(prefix));
    let executable = std::env::current_exe()?;
    let endpoints = endpoints.join(",");
    let spawn = |role: &[&str], label: &str| {
        let mut command = Command::new(&executable);
        command
            .args(role)
            .args(["--prefix", prefix, "--endpoints", &endpoints]);
        Relayed::spawn(command, label)
    };
    let observer = spawn(&["--observer"], "[observer]    ")?;
    let mut candidates = BTreeMap::new();
    for name in CANDIDATES {
        candidates.insert(name, spawn(&["--candidate", name], &format!("[{name}] "))?);
    }

    let first = next_leader(&mut leaders, None, Duration::from_secs(10)).await?;
    let first_name = candidate_name(&first);
    println!(
        "parent: {first_name} leads; letting its job run for {:?}",
        args.lead_for
    );
    tokio::time::sleep(args.lead_for).await;
    let mut crashed = candidates
        .remove(first_name.as_str())
        .ok_or_else(|| format!("the leader {first_name:?} is none of the candidates"))?;
    let pid = crashed.pid().unwrap_or_default();
    crashed.child.kill().await?; // SIGKILL: a crash, nothing resigns
    let killed_at = Instant::now();
    println!(
        "parent: killed {first_name} (pid {pid}) with SIGKILL; its lease expires within its TTL ({CANDIDATE_TTL:?})"
    );
    let second = next_leader(&mut leaders, Some(&first), Duration::from_secs(10)).await?;
    let failover = killed_at.elapsed();
    let second_name = candidate_name(&second);
    println!(
        "parent: {second_name} took over {:.2} s after the kill",
        failover.as_secs_f64()
    );
    tokio::time::sleep(args.lead_for).await;

    let paused = candidates
        .remove(second_name.as_str())
        .ok_or_else(|| format!("the leader {second_name:?} is none of the candidates"))?;
    paused.signal(libc::SIGSTOP);
    let paused_at = Instant::now();
    println!(
        "parent: paused {second_name} with SIGSTOP for {PAUSE:?}, past its TTL ({CANDIDATE_TTL:?}); it still believes it leads"
    );
    let third = next_leader(&mut leaders, Some(&second), Duration::from_secs(10)).await?;
    let third_name = candidate_name(&third);
    println!(
        "parent: {third_name} took over {:.2} s into the pause",
        paused_at.elapsed().as_secs_f64()
    );
    tokio::time::sleep_until(paused_at + PAUSE).await;
    paused.signal(libc::SIGCONT);
    println!("parent: resumed {second_name} with SIGCONT; it must stop its job by itself");
    let deposed = match paused.wait(RESUME_LIMIT).await {
        Ok((status, last_line)) => {
            let said = last_line.unwrap_or_default();
            status.success() && said.starts_with("done: leadership lost")
        }
        Err(error) => {
            println!("parent: {second_name}: {}", common::describe(&*error));
            false
        }
    };
    tokio::time::sleep(args.lead_for).await;

    let leader = candidates
        .remove(third_name.as_str())
        .ok_or_else(|| format!("the leader {third_name:?} is none of the candidates"))?;
    println!("parent: stopping the leader and the observer with SIGTERM");
    let mut unclean = Vec::new();
    stop(leader, &third_name, &mut unclean).await?;
    // Let the observer report that nobody leads any more before stopping it.
    let _ = tokio::time::timeout(Duration::from_secs(1), leaders.next()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop(observer, "observer", &mut unclean).await?;
    within(REQUEST_LIMIT, "close the session", session.close()).await?;

    println!("checking the heartbeat history in etcd:");
    let beats = read_beats(client, &beats_prefix(prefix)).await?;
    let runs = leader_runs(&beats);
    for run in &runs {
        println!(
            "  {} heartbeats by {} with fencing token {}",
            run.beats, run.name, run.token
        );
    }
    let mut checks = Checks::default();
    checks.check(
        unclean.is_empty(),
        if unclean.is_empty() {
            "the processes left stopped cleanly on SIGTERM".to_owned()
        } else {
            format!(
                "processes that did not stop cleanly: {}",
                unclean.join(", ")
            )
        },
    );
    // Each heartbeat commits only while its writer's key still has the create revision it
    // campaigned with (its fencing token), so a deposed leader's heartbeat cannot commit.
    // Had two processes run the job at once, their heartbeats would interleave in revision
    // order: an older token would come back after a newer one. So the history must be one
    // run of heartbeats per leader, tokens increasing, each token used by one candidate.
    let increasing = runs.windows(2).all(|pair| pair[0].token < pair[1].token);
    let mut owners: HashMap<i64, &str> = HashMap::new();
    let one_owner = beats
        .iter()
        .all(|beat| *owners.entry(beat.token).or_insert(&beat.name) == beat.name);
    checks.check(
        increasing && one_owner,
        format!(
            "one process ran the job at a time: {} heartbeats in {} runs, tokens never go back, \
             each token used by one candidate",
            beats.len(),
            runs.len()
        ),
    );
    let expected = [
        (&first_name, first.create_revision()),
        (&second_name, second.create_revision()),
        (&third_name, third.create_revision()),
    ];
    let observed: Vec<(&String, i64)> = runs.iter().map(|run| (&run.name, run.token)).collect();
    checks.check(
        observed == expected,
        format!(
            "the job ran under {first_name} (token {}), then {second_name} (token {}), then \
             {third_name} (token {})",
            first.create_revision(),
            second.create_revision(),
            third.create_revision()
        ),
    );
    checks.check(
        deposed,
        format!(
            "{second_name}, paused past its TTL and resumed, found its leadership lost by itself, \
             stopped its job and exited"
        ),
    );
    checks.check(
        (FAILOVER_FLOOR..=FAILOVER_LIMIT).contains(&failover),
        format!(
            "failover in {:.2} s (from {} s, what the lease had left after its last \
             renewal, to TTL {} s + 2 s = {} s)",
            failover.as_secs_f64(),
            FAILOVER_FLOOR.as_secs(),
            CANDIDATE_TTL.as_secs(),
            FAILOVER_LIMIT.as_secs()
        ),
    );
    Ok(checks.verdict(format!(
        "failover from {first_name} to {second_name} in {:.2} s after SIGKILL; \
         {second_name}, paused past its TTL, stopped its job by itself when resumed; one leader \
         at a time over {} heartbeats",
        failover.as_secs_f64(),
        beats.len()
    )))
}

/// The candidate name a leader campaigned with.
fn candidate_name(leader: &Leader) -> String {
    String::from_utf8_lossy(leader.value()).into_owned()
}

/// Stops a child with SIGTERM (killing it after [`STOP_LIMIT`]); adds it to `unclean` if
/// it did not exit with success.
async fn stop(child: Relayed, name: &str, unclean: &mut Vec<String>) -> Result<()> {
    child.signal(libc::SIGTERM);
    let (status, _) = child.wait(STOP_LIMIT).await?;
    if !status.success() {
        unclean.push(format!("{name} ({status})"));
    }
    Ok(())
}

/// Waits up to `limit` for a leader other than `previous` (compared by key: the same
/// candidate re-elected would be a new key, since its lease is new).
async fn next_leader(
    leaders: &mut Observe,
    previous: Option<&Leader>,
    limit: Duration,
) -> Result<Leader> {
    let deadline = Instant::now() + limit;
    loop {
        let change = tokio::time::timeout_at(deadline, leaders.next())
            .await
            .map_err(|_| format!("no new leader within {limit:?}"))?;
        match change {
            Some(Ok(Some(leader))) if previous.is_none_or(|p| p.key() != leader.key()) => {
                return Ok(leader);
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => println!(
                "parent: observe failed, retrying: {}",
                common::describe(&error)
            ),
            None => return Err("the observation stream ended".into()),
        }
    }
}

/// One heartbeat as found in etcd.
struct Beat {
    name: String,
    token: i64,
}

/// Consecutive heartbeats with one fencing token.
struct LeaderRun {
    name: String,
    token: i64,
    beats: usize,
}

/// The heartbeats under `prefix`, in the order they were committed (mod revision).
async fn read_beats(client: &Client, prefix: &str) -> Result<Vec<Beat>> {
    let options = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Mod, SortOrder::Ascend);
    let answer = within(
        REQUEST_LIMIT,
        "read the heartbeats",
        client.clone().get(prefix, Some(options)),
    )
    .await?;
    answer
        .kvs()
        .iter()
        .map(|kv| {
            let value = kv.value_str()?;
            let (name, token) = value
                .split_once(' ')
                .ok_or_else(|| format!("a malformed heartbeat: {value:?}"))?;
            Ok(Beat {
                name: name.to_owned(),
                token: token.parse()?,
            })
        })
        .collect()
}

fn leader_runs(beats: &[Beat]) -> Vec<LeaderRun> {
    let mut runs: Vec<LeaderRun> = Vec::new();
    for beat in beats {
        match runs.last_mut() {
            Some(run) if run.token == beat.token && run.name == beat.name => run.beats += 1,
            _ => runs.push(LeaderRun {
                name: beat.name.clone(),
                token: beat.token,
                beats: 1,
            }),
        }
    }
    runs
}
