//! Helpers shared by the examples: where etcd is (`--endpoints` or a throwaway cluster),
//! fresh key prefixes, bounded waits, child processes that never outlive their parent,
//! and the checks that end in one verdict line.
#![allow(dead_code)] // each example uses its own subset

use std::error::Error;
use std::future::Future;
use std::io::IsTerminal;
use std::panic::AssertUnwindSafe;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, DeleteOptions};
use etcd_concurrency::testing::EtcdCluster;
use futures::FutureExt;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::JoinHandle;

pub type BoxError = Box<dyn Error + Send + Sync>;
pub type Result<T, E = BoxError> = std::result::Result<T, E>;

/// How long one request to etcd may take in the examples before they give up.
pub const REQUEST_LIMIT: Duration = Duration::from_secs(10);

/// Where etcd is.
#[derive(clap::Args, Debug)]
pub struct EtcdArgs {
    /// etcd client URLs, comma-separated (default: start a throwaway 3-member cluster)
    #[arg(long, env = "ETCD_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<String>,
}

/// The etcd cluster an example runs against; a throwaway one stops when this is dropped.
pub struct Etcd {
    pub endpoints: Vec<String>,
    _throwaway: Option<EtcdCluster>,
}

impl EtcdArgs {
    /// The cluster at `--endpoints`, or a throwaway 3-member cluster when none is given.
    async fn cluster(&self) -> Result<Etcd> {
        if !self.endpoints.is_empty() {
            println!("using etcd at {}", self.endpoints.join(","));
            return Ok(Etcd {
                endpoints: self.endpoints.clone(),
                _throwaway: None,
            });
        }
        let cluster = start_throwaway_cluster().await?;
        Ok(Etcd {
            endpoints: cluster.endpoints(),
            _throwaway: Some(cluster),
        })
    }
}

/// Starts a throwaway 3-member etcd cluster (the `testing` kit), stopped when dropped.
pub async fn start_throwaway_cluster() -> Result<EtcdCluster> {
    println!("starting a throwaway 3-member etcd cluster");
    // The kit panics with a helpful message (e.g. how to install etcd); turn that into an
    // error so that the example still ends with its verdict line.
    let cluster = AssertUnwindSafe(EtcdCluster::start(3))
        .catch_unwind()
        .await
        .map_err(|_| "could not start a throwaway etcd cluster (see the message above)")?;
    println!("etcd cluster up at {}", cluster.endpoints().join(","));
    Ok(cluster)
}

/// A key prefix no other run uses: `/demo/<example>/<random hex>`.
fn fresh_prefix(example: &str) -> String {
    format!("/demo/{example}/{:08x}", rand::random::<u32>())
}

/// Connects a client to `endpoints`.
pub async fn connect(endpoints: &[String]) -> Result<Client> {
    connect_with(endpoints, ConnectOptions::new()).await
}

/// Connects a client to `endpoints` with `options` (a user to log in as, say), giving up on
/// an endpoint after 5 s.
pub async fn connect_with(endpoints: &[String], options: ConnectOptions) -> Result<Client> {
    let options = options.with_connect_timeout(Duration::from_secs(5));
    within(REQUEST_LIMIT, "connect to etcd", async {
        Client::connect(endpoints, Some(options)).await
    })
    .await
}

/// Deletes every key under `prefix`, so that runs against a shared cluster leave nothing.
pub async fn delete_prefix(client: &Client, prefix: &str) -> Result<()> {
    let options = DeleteOptions::new().with_prefix();
    within(REQUEST_LIMIT, "clean up", async {
        client.clone().delete(prefix, Some(options)).await
    })
    .await?;
    println!("deleted the example's keys under {prefix}");
    Ok(())
}

/// Runs `run` against the cluster of `etcd` with its endpoints, a client and a fresh key
/// prefix for `example`, then deletes every key under that prefix whether it succeeded,
/// failed or was stopped by Ctrl-C or SIGTERM, so that no run leaves keys on a shared
/// cluster. A throwaway cluster stops on return, with its data. Returns what `run`
/// returned (an error naming the signal if one stopped it), or the clean-up's error if
/// only that failed.
pub async fn on_fresh_prefix<T>(
    etcd: &EtcdArgs,
    example: &str,
    run: impl AsyncFnOnce(&[String], &Client, &str) -> Result<T>,
) -> Result<T> {
    let stopped = StopSignal::listen();
    tokio::pin!(stopped);
    let stopped_by = |signal: StopSignal| format!("{signal}: the run was stopped").into();
    let etcd = tokio::select! {
        etcd = etcd.cluster() => etcd?,
        signal = &mut stopped => return Err(stopped_by(signal)),
    };
    let client = connect(&etcd.endpoints).await?;
    let prefix = fresh_prefix(example);
    let outcome = tokio::select! {
        outcome = run(&etcd.endpoints, &client, &prefix) => outcome,
        signal = &mut stopped => Err(stopped_by(signal)),
    };
    let cleaned = delete_prefix(&client, &format!("{prefix}/")).await;
    let value = outcome?;
    cleaned?;
    Ok(value)
}

/// A signal that asks a run to stop.
#[derive(Clone, Copy, Debug)]
pub enum StopSignal {
    /// SIGINT, from Ctrl-C.
    Interrupt,
    /// SIGTERM, from `kill` or `timeout`, say.
    Terminate,
}

impl StopSignal {
    /// Starts listening for both signals at once (they no longer end the process) and
    /// resolves with the first one to come.
    pub fn listen() -> impl Future<Output = StopSignal> {
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            tokio::select! {
                () = next(interrupt) => StopSignal::Interrupt,
                () = next(terminate) => StopSignal::Terminate,
            }
        }
    }

    /// The exit code of a process this signal ended: 128 plus the signal's number.
    pub fn exit_code(self) -> ExitCode {
        ExitCode::from(match self {
            StopSignal::Interrupt => 130,
            StopSignal::Terminate => 143,
        })
    }
}

impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopSignal::Interrupt => "interrupted (SIGINT)",
            StopSignal::Terminate => "terminated (SIGTERM)",
        })
    }
}

/// Waits for the next delivery of a signal that could be listened for; never, if not.
async fn next(listener: std::io::Result<Signal>) {
    match listener {
        Ok(mut listener) => {
            listener.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// Awaits `future`, failing with a message naming `what` if it takes longer than `limit`
/// or returns an error.
pub async fn within<T, E>(
    limit: Duration,
    what: &str,
    future: impl Future<Output = Result<T, E>>,
) -> Result<T>
where
    E: Into<BoxError>,
{
    match tokio::time::timeout(limit, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(format!("cannot {what}: {}", describe(&*error.into())).into()),
        Err(_) => Err(format!("cannot {what}: no answer within {limit:?}").into()),
    }
}

/// An error and its sources, joined by `: `.
pub fn describe(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Logs the library's warnings (e.g. a release that failed in the background) to stderr;
/// `RUST_LOG` can ask for more.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// A child process whose output is relayed line by line, each line prefixed with a label.
/// It never outlives this process: it is killed when the handle is dropped, and by the
/// kernel if this process dies first.
pub struct Relayed {
    pub child: Child,
    stdout: JoinHandle<Option<String>>,
    stderr: JoinHandle<Option<String>>,
}

impl Relayed {
    /// Starts `command` with its stdout relayed to ours and its stderr to ours.
    pub fn spawn(mut command: Command, label: &str) -> Result<Relayed> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        die_with_parent(&mut command);
        let mut child = command.spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or("the child's stdout is not piped")?;
        let stderr = child
            .stderr
            .take()
            .ok_or("the child's stderr is not piped")?;
        Ok(Relayed {
            child,
            stdout: tokio::spawn(relay(stdout, tokio::io::stdout(), label.to_owned())),
            stderr: tokio::spawn(relay(stderr, tokio::io::stderr(), label.to_owned())),
        })
    }

    /// The child's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the child, if it still runs.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.child.id() {
            // SAFETY: `kill` has no memory-safety preconditions; the pid is our child's,
            // not yet reaped (`id()` is `None` once it is), so it cannot have been reused.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// Waits up to `limit` for the child to exit (killing it if it does not) and for its
    /// output to be relayed. Returns its exit status and the last line of its stdout.
    pub async fn wait(mut self, limit: Duration) -> Result<(ExitStatus, Option<String>)> {
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                self.child.kill().await?;
                return Err(
                    format!("a child process did not exit within {limit:?}: killed").into(),
                );
            }
        };
        // The pipes close when the child exits; a grandchild holding them is not waited for.
        let grace = Duration::from_secs(2);
        let last_line = tokio::time::timeout(grace, &mut self.stdout)
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        let _ = tokio::time::timeout(grace, &mut self.stderr).await;
        Ok((status, last_line))
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        self.stdout.abort();
        self.stderr.abort();
    }
}

/// Copies `input` to `output` line by line, each prefixed with `label`; returns the last
/// line.
async fn relay(
    input: impl AsyncRead + Unpin,
    mut output: impl AsyncWrite + Unpin,
    label: String,
) -> Option<String> {
    let mut lines = BufReader::new(input).lines();
    let mut last = None;
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = output
            .write_all(format!("{label}{line}\n").as_bytes())
            .await;
        let _ = output.flush().await;
        last = Some(line);
    }
    last
}

/// Makes the kernel kill the child (SIGKILL) when this process dies, however it dies.
fn die_with_parent(command: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
    // which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The checks behind a verdict, printed as they are made.
#[derive(Default)]
pub struct Checks {
    failed: Vec<String>,
}

/// The outcome of a run: `OK` or `FAILED`, with one line of explanation.
pub struct Verdict {
    pub ok: bool,
    pub text: String,
}

impl Checks {
    /// Records and prints one check.
    pub fn check(&mut self, passed: bool, what: impl Into<String>) {
        let what = what.into();
        println!("  [{}] {what}", if passed { "pass" } else { "FAIL" });
        if !passed {
            self.failed.push(what);
        }
    }

    /// `OK` + `summary` if every check passed, `FAILED` + the failed checks otherwise.
    pub fn verdict(self, summary: impl Into<String>) -> Verdict {
        if self.failed.is_empty() {
            Verdict {
                ok: true,
                text: summary.into(),
            }
        } else {
            Verdict {
                ok: false,
                text: self.failed.join("; "),
            }
        }
    }
}

/// Prints the verdict line (`OK ...` or `FAILED ...`) and returns the matching exit code.
pub fn conclude(outcome: Result<Verdict>) -> ExitCode {
    match outcome {
        Ok(Verdict { ok: true, text }) => {
            println!("OK: {text}");
            ExitCode::SUCCESS
        }
        Ok(Verdict { ok: false, text }) => {
            println!("FAILED: {text}");
            ExitCode::FAILURE
        }
        Err(error) => {
            println!("FAILED: {}", describe(&*error));
            ExitCode::FAILURE
        }
    }
}
