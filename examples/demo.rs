//! The demo behind `scripts/demo`: runs the three examples in turn (`bank_transfer` twice,
//! plain and with `--read-cache`) on one throwaway 3-member etcd cluster, and sums up their
//! verdicts.
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

/// One run of an example: its executable, its arguments (besides `--endpoints`) and what
/// it shows.
struct Example {
    name: &'static str,
    args: &'static [&'static str],
    shows: &'static str,
}

/// The runs, in order.
const EXAMPLES: [Example; 4] = [
    Example {
        name: "critical_section",
        args: &[],
        shows: "4 processes take one Mutex 10 times each; writes fenced by the lock",
    },
    Example {
        name: "leader_job",
        args: &[],
        shows: "3 candidates campaign; the leader's job is fenced; SIGKILL a leader, SIGSTOP the next",
    },
    Example {
        name: "bank_transfer",
        args: &[],
        shows: "8 workers move money between 16 accounts with Stm at serializable-snapshot",
    },
    Example {
        name: "bank_transfer",
        args: &["--read-cache"],
        shows: "the same, the workers reading the balances from one shared ReadCache",
    },
];
/// How long one example may run before it is killed and counted as failed.
const EXAMPLE_LIMIT: Duration = Duration::from_secs(120);

impl Example {
    /// The command line without `--endpoints`, as the summary names the run.
    fn label(&self) -> String {
        std::iter::once(self.name)
            .chain(self.args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// How one run ended.
struct Outcome {
    label: String,
    ok: bool,
    verdict: String,
    took: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::init_tracing();
    // On Ctrl-C or SIGTERM (e.g. from `timeout`), `run` is dropped, and with it the
    // cluster: its members and their data (in tmpfs, where it would hold memory).
    let stopped = common::StopSignal::listen();
    let finished = tokio::select! {
        finished = run() => finished,
        signal = stopped => {
            println!("{signal}: stopped the etcd cluster");
            return signal.exit_code();
        }
    };
    match finished {
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
    for Example { name, .. } in EXAMPLES {
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
    for example in &EXAMPLES {
        println!();
        println!("=== {}: {}", example.label(), example.shows);
        outcomes.push(run_example(directory, example, &endpoints).await);
    }
    drop(cluster);
    println!();
    println!("stopped the etcd cluster");

    println!();
    println!("=== summary");
    for outcome in &outcomes {
        println!(
            "{:<26} {:>5.1} s  {}",
            outcome.label,
            outcome.took.as_secs_f64(),
            outcome.verdict
        );
    }
    let all_ok = outcomes.iter().all(|outcome| outcome.ok);
    if all_ok {
        println!("OK: all {} runs passed", outcomes.len());
    } else {
        let failed: Vec<&str> = outcomes
            .iter()
            .filter(|o| !o.ok)
            .map(|o| o.label.as_str())
            .collect();
        println!("FAILED: {}", failed.join(", "));
    }
    Ok(all_ok)
}

/// Runs one example against `endpoints`, relaying its output indented.
async fn run_example(directory: &Path, example: &Example, endpoints: &str) -> Outcome {
    let started = Instant::now();
    let mut command = Command::new(directory.join(example.name));
    command.args(["--endpoints", endpoints]).args(example.args);
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
        label: example.label(),
        ok,
        verdict,
        took: started.elapsed(),
    }
}
