//! Throwaway etcd clusters of real `etcd` processes on loopback.

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, MemberListResponse};

use super::peer_links::PeerLinks;

/// How long a member may take to become healthy before `start`/`restart` panic.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times `start` picks fresh ports when another process took one first.
const PORT_ATTEMPTS: usize = 3;
/// Raft timing: short enough that the server accepts 1 s leases (its minimum TTL is
/// 1.5 × the election timeout, rounded up to whole seconds).
const HEARTBEAT_MS: u32 = 50;
const ELECTION_TIMEOUT_MS: u32 = 500;

/// A throwaway etcd cluster of 1 or 3 members on free loopback ports, data in tmpfs (on disk
/// when `/dev/shm` has less than 192 MiB free per member: each preallocates 128 MB of
/// write-ahead log, and its database grows). Each member `i` keeps its data in
/// `m<i>/` and its log in `m<i>.log` of one directory per cluster,
/// `/dev/shm/etcd-test-<pid>-<random>/` (or the same name under `$TMPDIR`, by default
/// `/tmp`, on disk).
///
/// Each member is a real `etcd` process started with `--unsafe-no-fsync`, a 50 ms heartbeat
/// and a 500 ms election timeout, so leases as short as 1 s are honoured, and with
/// `--grpc-keepalive-min-time=500ms`, so clients may ping it every second. Members reach
/// one another through a proxy in front of each one's peer port (run by a thread of its
/// own), so that [`isolate`](Self::isolate) can cut one off from the others. Dropping the
/// cluster kills every member and deletes its data, also while a test unwinds from a panic,
/// after printing the last 30 lines of each member's log to stderr (which the test harness
/// shows with the failure); members also die with the process that started them
/// (`PR_SET_PDEATHSIG`, set from one thread that lives as long as the process), so a
/// killed test process leaves no etcd behind, and the data it leaves is deleted when the
/// next cluster starts. A cluster may be shared between tests (each test on its own
/// thread) through a handle each test owns; a `static` one is never dropped, so its data
/// stays until the next cluster starts.
///
/// The binary is `etcd` from `PATH`, or `$ETCD_BIN`. Methods that change a member take
/// `&self`, so a fault schedule can run in its own task while workers use the cluster.
/// No counterpart in Go's `concurrency` package; the nearest is etcd's own test harness,
/// `integration.NewClusterV3`, which runs its members inside the test process.
///
/// ```no_run
/// # async fn example() {
/// use etcd_concurrency::testing::EtcdCluster;
///
/// let cluster = EtcdCluster::start(3).await;
/// let leader = cluster.leader().await.expect("a leader");
/// cluster.kill(leader);
/// cluster.restart(leader).await;
/// # }
/// ```
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Mutex<Member>>,
    initial_cluster: String,
    token: String,
    links: PeerLinks,
    // Declared last: the data directory goes only after every process is stopped.
    dir: tempfile::TempDir,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    /// The port of the member's link proxy, which the other members dial.
    peer_port: u16,
    /// The port the member itself listens on for its peers.
    own_peer_port: u16,
    process: Option<Child>,
}

impl EtcdCluster {
    /// Starts a cluster of `members` (1 or 3) and returns once every member answers a
    /// linearizable read.
    ///
    /// # Panics
    ///
    /// If `members` is not 1 or 3, if `etcd` is not installed (the message says how to
    /// install it), if a member does not become healthy within 30 s (the message holds
    /// the tail of its log), or outside a Tokio runtime with its I/O and time drivers
    /// (which the health checks, `restart` and `leader` need too).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the members started so far and deletes their data.
    pub async fn start(members: usize) -> EtcdCluster {
        assert!(
            members == 1 || members == 3,
            "EtcdCluster::start takes 1 or 3 members, not {members}"
        );
        // At once, with Tokio's message, rather than after 30 s of failed health checks.
        let _ = tokio::net::TcpListener::bind("127.0.0.1:0").await;
        let binary = etcd_binary();
        let mut last_failure = String::new();
        let mut in_tmpfs = true;
        for _ in 0..PORT_ATTEMPTS {
            let cluster = EtcdCluster::launch(&binary, members, in_tmpfs);
            match cluster.wait_all_healthy().await {
                Ok(()) => return cluster,
                Err(failure) if failure.contains("address already in use") => {
                    last_failure = failure;
                }
                // tmpfs filled up (by other clusters started at the same time, say): the
                // next attempt keeps its data on disk.
                Err(failure) if in_tmpfs && failure.contains("no space left on device") => {
                    in_tmpfs = false;
                    last_failure = failure;
                }
                Err(failure) => panic!("{failure}"),
            }
        }
        panic!("{last_failure}")
    }

    fn launch(binary: &Path, members: usize, in_tmpfs: bool) -> EtcdCluster {
        let dir = data_root(members, in_tmpfs);
        // Bound first and kept open, so that neither another process nor `free_ports`
        // can take them.
        let link_listeners: Vec<TcpListener> = (0..members)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
            .collect();
        let ports = free_ports(2 * members);
        let members: Vec<Member> = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: link_listeners[i]
                    .local_addr()
                    .expect("local address")
                    .port(),
                own_peer_port: ports[2 * i + 1],
                process: None,
            })
            .collect();
        let own_peer_ports: Vec<u16> = members.iter().map(|m| m.own_peer_port).collect();
        let links = PeerLinks::start(link_listeners, &own_peer_ports);
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("test-{}", rand::random::<u64>());
        let cluster = EtcdCluster {
            members: members.into_iter().map(Mutex::new).collect(),
            initial_cluster,
            token,
            links,
            dir,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn_member(binary, i);
        }
        cluster
    }

    /// The client URLs of all members, in member order (`http://127.0.0.1:PORT`).
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The client URL of member `i`.
    ///
    /// # Panics
    ///
    /// If there is no member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.member(i).client_port)
    }

    /// How many members the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always `false`: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// A client connected to every member's endpoint (etcd-client balances requests
    /// across them), with etcd-client's default options: no keep-alive pings, so a request
    /// to a killed or paused member waits for its own time limit, and no
    /// `require_leader`, so a watch on a member cut off from its peers stays open, silent.
    /// For fault tests, connect with the options the [`Session`](crate::Session) docs
    /// recommend:
    ///
    /// ```no_run
    /// # async fn example(cluster: etcd_concurrency::testing::EtcdCluster) {
    /// use std::time::Duration;
    /// use etcd_client::{Client, ConnectOptions};
    ///
    /// let options = ConnectOptions::new()
    ///     .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
    ///     .with_require_leader(true);
    /// let client = Client::connect(cluster.endpoints(), Some(options)).await.unwrap();
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// If the endpoints cannot be parsed (never for a running cluster), or outside a Tokio
    /// runtime (etcd-client's channel spawns a task).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only connects.
    pub async fn client(&self) -> Client {
        Client::connect(self.endpoints(), None)
            .await
            .expect("connect to the test cluster")
    }

    /// The OS process id of member `i`, or `None` if it is not running.
    ///
    /// # Panics
    ///
    /// If there is no member `i`.
    pub fn pid(&self, i: usize) -> Option<u32> {
        running(&mut self.member(i)).map(|process| process.id())
    }

    /// The index of the member that is the raft leader now, if one answers as such. Asks
    /// each running member for its status, giving each 1 s.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime with its I/O and time drivers.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.members.len() {
            if self.pid(i).is_none() {
                continue;
            }
            let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(1), async {
                connect_one(&self.endpoint(i)).await?.status().await
            })
            .await
            else {
                continue;
            };
            if status.leader() != 0
                && status.leader() == status.header().map_or(0, |h| h.member_id())
            {
                return Some(i);
            }
        }
        None
    }

    /// Kills member `i` with SIGKILL (a crash: no clean shutdown) and reaps it. Does
    /// nothing if it is not running.
    ///
    /// # Panics
    ///
    /// If there is no member `i`.
    pub fn kill(&self, i: usize) {
        let mut member = self.member(i);
        if let Some(mut process) = member.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Stops member `i` with SIGSTOP: its connections stay open but nothing is answered,
    /// as with a long GC pause or a frozen VM. Returns once every thread of it has
    /// stopped (a signal takes effect asynchronously: a request sent right after the
    /// signal could still be answered).
    ///
    /// # Panics
    ///
    /// If there is no member `i`, or if it has not stopped within 5 s.
    pub fn pause(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
        if let Some(pid) = self.pid(i) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !all_threads_stopped(pid) {
                assert!(Instant::now() < deadline, "member {i} did not stop");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Resumes member `i` after [`pause`](Self::pause) (SIGCONT).
    ///
    /// # Panics
    ///
    /// If there is no member `i`.
    pub fn resume(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    /// Cuts member `i` off from the other members, as a network partition would, while
    /// clients still reach every member: the connections between it and them are closed,
    /// and new ones as soon as a request on them names an isolated sender or they reach
    /// an isolated member. Returns at once; raft then does the rest: an isolated follower
    /// loses its leader after an election timeout (500 ms) and campaigns alone, in vain,
    /// and an isolated leader steps down after one (etcd's check-quorum), while the
    /// others, if a majority, elect a leader among themselves. etcd 3.4 runs without
    /// pre-vote by default, so the isolated member's term keeps rising, and on rejoining
    /// it makes the others elect a leader again. A connection on which an isolated member
    /// sends only requests that do not name their sender (what a follower forwards to
    /// its leader, lease renewals among them, and etcd's probes) still passes; raft's own
    /// requests always name it, and forwarding ends once the member has lost its leader.
    /// Isolating a member again does nothing; several may be isolated at once (each from
    /// all the others).
    ///
    /// Nothing in Go's `concurrency` package; etcd's Go integration tests call
    /// `InjectPartition` on a member for the same purpose.
    ///
    /// # Panics
    ///
    /// If there is no member `i`.
    pub fn isolate(&self, i: usize) {
        assert!(i < self.members.len(), "there is no member {i}");
        self.links.isolate(i);
    }

    /// Ends [`isolate`](Self::isolate): member `i` and the others connect to one another
    /// again (etcd re-dials on its own within a second or so) and it rejoins the cluster,
    /// catching up on what it missed. Does nothing if it is not isolated.
    ///
    /// # Panics
    ///
    /// If there is no member `i`.
    pub fn rejoin(&self, i: usize) {
        assert!(i < self.members.len(), "there is no member {i}");
        self.links.rejoin(i);
    }

    /// Starts member `i` again on the same ports and data (killing it first if it runs)
    /// and returns once it answers a linearizable read.
    ///
    /// # Panics
    ///
    /// If there is no member `i`, if `etcd` cannot be found or started, if the member does
    /// not become healthy within 30 s (the message holds its log tail), or outside a Tokio
    /// runtime with its I/O and time drivers.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future after the member was started leaves it running, not yet known
    /// to be healthy; the cluster still stops it when dropped.
    pub async fn restart(&self, i: usize) {
        self.kill(i);
        self.spawn_member(&etcd_binary(), i);
        if let Err(failure) = self.wait_healthy(i, &[i]).await {
            panic!("{failure}");
        }
    }

    fn signal(&self, i: usize, signal: libc::c_int) {
        let mut member = self.member(i);
        if let Some(process) = running(&mut member) {
            // SAFETY: `kill` has no memory-safety preconditions; the pid is our own child,
            // not reaped (only this lock's holders reap it), so it cannot have been reused.
            unsafe { libc::kill(process.id() as libc::pid_t, signal) };
        }
    }

    fn member(&self, i: usize) -> std::sync::MutexGuard<'_, Member> {
        self.members[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn spawn_member(&self, binary: &Path, i: usize) {
        let mut member = self.member(i);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path(&member.name))
            .expect("create the member's log file");
        let client_url = format!("http://127.0.0.1:{}", member.client_port);
        let own_peer_url = format!("http://127.0.0.1:{}", member.own_peer_port);
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let mut command = Command::new(binary);
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(self.dir.path().join(&member.name))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &own_peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .arg("--unsafe-no-fsync")
            .arg(format!("--heartbeat-interval={HEARTBEAT_MS}"))
            .arg(format!("--election-timeout={ELECTION_TIMEOUT_MS}"))
            // Let clients detect a frozen member with HTTP/2 pings every second (etcd's
            // default refuses pings more often than every 5 s).
            .arg("--grpc-keepalive-min-time=500ms")
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file handle"))
            .stderr(log);
        let parent = std::process::id();
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // prctl, getppid and raise, which are async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died between the fork and the prctl: no signal will come.
                if libc::getppid() as u32 != parent {
                    libc::raise(libc::SIGKILL);
                }
                Ok(())
            });
        }
        let process = spawn_from_lasting_thread(command)
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        member.process = Some(process);
    }

    async fn wait_all_healthy(&self) -> Result<(), String> {
        let all: Vec<usize> = (0..self.members.len()).collect();
        for i in 0..self.members.len() {
            self.wait_healthy(i, &all).await?;
        }
        Ok(())
    }

    /// Waits until member `i` serves a linearizable read (so it has a leader), or fails
    /// with the tail of its log; or, as soon as one of the members `watched` exits (which
    /// may leave `i` without quorum), with the tail of that member's log.
    async fn wait_healthy(&self, i: usize, watched: &[usize]) -> Result<(), String> {
        let endpoint = self.endpoint(i);
        let (name, peer_url) = {
            let member = self.member(i);
            let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
            (member.name.clone(), peer_url)
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_error = String::from("no attempt made");
        let mut log_of = name.clone();
        while Instant::now() < deadline {
            let exited = watched
                .iter()
                .find_map(|&j| self.exit_status(j).map(|status| (j, status)));
            if let Some((j, status)) = exited {
                log_of = self.member(j).name.clone();
                last_error = format!("member {log_of} exited with {status}");
                break;
            }
            let attempt = tokio::time::timeout(Duration::from_secs(1), async {
                let mut client = connect_one(&endpoint).await?;
                match client.get("health", None).await {
                    // Authentication is on: etcd checks the (missing) user only after the
                    // linearizable read, so the member serves.
                    Err(error) if error.to_string().contains(USER_EMPTY) => {}
                    read => drop(read?),
                }
                client.member_list().await
            })
            .await;
            match attempt {
                // Another cluster's member may have taken the port first (this member
                // then exits, and the cluster starts again on other ports): it is ours
                // only if it has our peer URL.
                Ok(Ok(list)) => {
                    let ours = list.members().iter().any(|member| {
                        member.name() == name && member.peer_urls().contains(&peer_url)
                    });
                    if ours {
                        self.learn_member_ids(&list);
                        return Ok(());
                    }
                    last_error = format!("another etcd answers on {endpoint}");
                }
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = "no answer within 1 s".into(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "etcd member {name} ({endpoint}) did not become healthy: {last_error}\n\
             --- last lines of the log of {log_of} ---\n{}",
            log_tail(&self.log_path(&log_of), 30)
        ))
    }

    /// Tells the links each member's id, found by its peer URL.
    fn learn_member_ids(&self, list: &MemberListResponse) {
        for i in 0..self.members.len() {
            let peer_url = format!("http://127.0.0.1:{}", self.member(i).peer_port);
            let found = list
                .members()
                .iter()
                .find(|m| m.peer_urls().contains(&peer_url));
            if let Some(member) = found {
                self.links.learn_id(i, member.id());
            }
        }
    }

    fn exit_status(&self, i: usize) -> Option<std::process::ExitStatus> {
        let mut member = self.member(i);
        member.process.as_mut()?.try_wait().ok().flatten()
    }
}

/// etcd's refusal of a request without a user while authentication is on.
const USER_EMPTY: &str = "etcdserver: user name is empty";

/// The member's process if it has not exited (one that has is reaped here).
fn running(member: &mut Member) -> Option<&mut Child> {
    let process = member.process.as_mut()?;
    matches!(process.try_wait(), Ok(None)).then_some(process)
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            // The test failed: etcd's side of it goes with its message, before the logs go
            // with the data.
            for i in 0..self.members.len() {
                let name = self.member(i).name.clone();
                let tail = log_tail(&self.log_path(&name), 30);
                eprintln!("--- last lines of the log of member {i} ({name}) ---\n{tail}");
            }
        }
    }
}

/// Spawns `command` from one thread that lives as long as the process, so that the
/// kernel's `PR_SET_PDEATHSIG` (sent when the *thread* that forked the child ends) kills
/// the child when the process dies, and not when the test thread or Tokio worker that
/// happened to start it ends while the cluster is still in use.
fn spawn_from_lasting_thread(command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, received) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("etcd-cluster-spawner".into())
            .spawn(move || {
                // Ends only with the process: the sender lives in a static.
                for (mut command, reply) in received {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("start the thread that spawns etcd members");
        Mutex::new(requests)
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the etcd spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the etcd spawner thread is gone"))?
}

async fn connect_one(endpoint: &str) -> Result<Client, etcd_client::Error> {
    let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(1));
    Client::connect([endpoint], Some(options)).await
}

fn etcd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ETCD_BIN") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("etcd"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "etcd is not installed (not on PATH, and ETCD_BIN is not set): on Debian, \
                 `apt-get install etcd-server` (this crate's scripts/install-deps does it)"
            )
        })
}

/// The start of the name of every member data directory, followed by the id of the
/// process that made it.
const DATA_PREFIX: &str = "etcd-test-";

/// The room one member's data takes in tmpfs at least: etcd preallocates its write-ahead
/// log in 64 MB segments, the current one and the next (128 MB), and its database grows.
const MEMBER_ROOM: u64 = 192 << 20;

/// A fresh directory for the data of `members` members, in tmpfs when `in_tmpfs` and the
/// machine has one with room for them ([`MEMBER_ROOM`] each; Docker's `/dev/shm` has 64 MiB
/// by default), else in the temporary directory. Directories left there by processes that
/// are gone (killed before dropping their clusters) are deleted first: in tmpfs they would
/// hold memory until the next reboot.
fn data_root(members: usize, in_tmpfs: bool) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let temp = std::env::temp_dir();
    let prefix = format!("{DATA_PREFIX}{}-", std::process::id());
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    // Both places: an earlier cluster may have kept its data in either.
    delete_orphans(&temp);
    if shm.is_dir() {
        delete_orphans(shm);
        let room = members as u64 * MEMBER_ROOM;
        if in_tmpfs && free_bytes(shm).is_some_and(|free| free >= room) {
            if let Ok(dir) = builder.tempdir_in(shm) {
                return dir;
            }
        }
    }
    builder
        .tempdir_in(temp)
        .expect("create a directory for etcd data")
}

/// The bytes an unprivileged process may still write in the file system of `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let stats = rustix::fs::statvfs(path).ok()?;
    Some(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// Deletes the member data directories in `parent` whose process no longer runs. Without
/// `/proc`, whether one runs is not known, and nothing is deleted.
fn delete_orphans(parent: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let owner = name
            .to_str()
            .and_then(|name| name.strip_prefix(DATA_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = owner.filter(|&pid| pid != std::process::id()) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// `count` distinct ports that were free a moment ago.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

fn log_tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc`); `true` for a
/// process that is gone.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    threads.flatten().all(|thread| {
        let stat = std::fs::read_to_string(thread.path().join("stat")).unwrap_or_default();
        // The state follows the command name, which is in parentheses.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        matches!(state, Some('T') | None)
    })
}
