//! The demo behind `scripts/demo`: runs the three examples in turn on one throwaway
//! 3-member etcd cluster, and sums up their verdicts.
//!
//! The examples' executables sit next to this one (`target/release/examples/`), so build
//! them all first:
//!
//! ```sh
//! cargo build --release --examples && target/release/examples/demo
//! ```
//!
//! or run `scripts/demo`, which also installs etcd when it is missing. Exits with code 1
//! if any example's verdict is not `OK`.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use tokio::process::Command;
use tokio::time::Instant;

use common::{Relayed, Result};

/// The examples, in the order they run, with what each shows.
const EXAMPLES: [(&str, &str); 3] = [
    (
        "critical_section",
        "4 processes take one Mutex 10 times each; writes fenced by the lock",
    ),
    (
        "leader_job",
        "3 candidates campaign; the leader's job is fenced; SIGKILL the leader, watch failover",
    ),
    (
        "bank_transfer",
        "8 workers move money between 16 accounts with Stm at serializable-snapshot",
    ),
];
/// How long one example may run before it is killed and counted as failed.
const EXAMPLE_LIMIT: Duration = Duration::from_secs(120);

/// How one example ended.
struct Outcome {
    name: &'static str,
    ok: bool,
    verdict: String,
    took: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::init_tracing();
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            println!("FAILED: {}", common::describe(&*error));
            ExitCode::FAILURE
        }
    }
}

/// Runs every example; returns whether all of them ended `OK`.
async fn run() -> Result<bool> {
    let executable = std::env::current_exe()?;
    let directory = executable
        .parent()
        .ok_or("the demo's executable has no parent directory")?;
    for (name, _) in EXAMPLES {
        if !directory.join(name).is_file() {
            return Err(format!(
                "{name} is not built next to the demo in {}: run `cargo build --release --examples`",
                directory.display()
            )
            .into());
        }
    }
    let cluster = common::start_throwaway_cluster().await?;
    let endpoints = cluster.endpoints().join(",");

    let mut outcomes = Vec::new();
    for (name, what) in EXAMPLES {
        println!();
        println!("=== {name}: {what}");
        outcomes.push(run_example(directory, name, &endpoints).await);
    }
    drop(cluster);
    println!();
    println!("stopped the etcd cluster");

    println!();
    println!("=== summary");
    for outcome in &outcomes {
        println!(
            "{:<17} {:>5.1} s  {}",
            outcome.name,
            outcome.took.as_secs_f64(),
            outcome.verdict
        );
    }
    let all_ok = outcomes.iter().all(|outcome| outcome.ok);
    if all_ok {
        println!("OK: all {} examples passed", outcomes.len());
    } else {
        let failed: Vec<&str> = outcomes.iter().filter(|o| !o.ok).map(|o| o.name).collect();
        println!("FAILED: {}", failed.join(", "));
    }
    Ok(all_ok)
}

/// Runs one example against `endpoints`, relaying its output indented.
async fn run_example(directory: &Path, name: &'static str, endpoints: &str) -> Outcome {
    let started = Instant::now();
    let mut command = Command::new(directory.join(name));
    command.args(["--endpoints", endpoints]);
    let ended = match Relayed::spawn(command, "  ") {
        Ok(example) => example.wait(EXAMPLE_LIMIT).await,
        Err(error) => Err(error),
    };
    let (ok, verdict) = match ended {
        Ok((status, last_line)) => {
            let verdict = last_line.filter(|l| l.starts_with("OK") || l.starts_with("FAILED"));
            match verdict {
                Some(verdict) if !verdict.starts_with("OK") => (false, verdict),
                Some(verdict) if status.success() => (true, verdict),
                Some(verdict) => (false, format!("FAILED: {status} after {verdict:?}")),
                None => (false, format!("FAILED: no verdict line ({status})")),
            }
        }
        Err(error) => (false, format!("FAILED: {}", common::describe(&*error))),
    };
    Outcome {
        name,
        ok,
        verdict,
        took: started.elapsed(),
    }
}
