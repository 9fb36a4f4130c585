//! The fault schedule shared by the `faults_*` tests, and a client configured to survive it.

use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use etcd_concurrency::testing::{EtcdCluster, Proxy};

use super::{millis, secs, within};

/// A client of all `endpoints` that notices a frozen or isolated member: HTTP/2 pings
/// every second (the test kit lets etcd accept them), a connect timeout, and
/// `require_leader`, so that a member without a leader cancels its watches.
pub async fn resilient_client(endpoints: &[String]) -> Client {
    let options = ConnectOptions::new()
        .with_keep_alive(secs(1), secs(1))
        .with_keep_alive_while_idle(true)
        .with_connect_timeout(secs(1))
        .with_require_leader(true);
    Client::connect(endpoints, Some(options))
        .await
        .expect("connect")
}

/// One proxy per member: a client connected through them can be cut off from the whole
/// cluster while everyone else keeps talking to it.
pub struct Isolation {
    proxies: Vec<Proxy>,
}

impl Isolation {
    pub async fn new(cluster: &EtcdCluster) -> Isolation {
        let mut proxies = Vec::new();
        for endpoint in cluster.endpoints() {
            proxies.push(Proxy::start(&endpoint).await.expect("start a proxy"));
        }
        Isolation { proxies }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.proxies.iter().map(Proxy::endpoint).collect()
    }

    /// The client of worker `id` of a fault test: worker 0 goes through the proxies (the
    /// schedule cuts it off), the others connect to the members directly.
    pub async fn worker_client(&self, cluster: &EtcdCluster, id: usize) -> Client {
        let endpoints = if id == 0 {
            self.endpoints()
        } else {
            cluster.endpoints()
        };
        resilient_client(&endpoints).await
    }

    pub fn cut(&self) {
        self.proxies.iter().for_each(Proxy::cut);
    }

    pub fn heal(&self) {
        self.proxies.iter().for_each(Proxy::heal);
    }
}

/// A fault and how long it lasts.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// SIGKILL member `i`, restart it after the pause.
    KillMember(usize),
    /// SIGKILL whichever member leads raft, restart it after the pause.
    KillLeader,
    /// SIGSTOP the raft leader for the duration, then SIGCONT.
    PauseLeader(Duration),
    /// Cut the raft leader off from the other members (clients still reach it) for the
    /// duration, then let it rejoin.
    IsolateLeader(Duration),
    /// Cut the isolated client off for the duration, then heal.
    CutOff(Duration),
}

/// The schedule of the fault tests: a member kill, a leader kill, a leader paused past
/// `ttl`, a leader cut off from its peers past `ttl`, and a client cut off past `ttl`.
pub fn schedule(ttl: Duration) -> Vec<Fault> {
    vec![
        Fault::KillMember(0),
        Fault::KillLeader,
        Fault::PauseLeader(ttl + secs(1)),
        Fault::IsolateLeader(ttl + secs(1)),
        Fault::CutOff(ttl + secs(1)),
    ]
}

/// Runs `faults` one after another. After each one heals, waits (at most 30 s) until
/// `progress()` has grown by `steps`: the workload must recover from every fault.
/// Returns a line per fault saying how long recovery took (and, for a leader cut off, how
/// much work was done meanwhile).
pub async fn inflict(
    cluster: &EtcdCluster,
    isolation: Option<&Isolation>,
    faults: &[Fault],
    progress: impl Fn() -> u64,
    steps: u64,
) -> Vec<String> {
    let mut report = Vec::new();
    for &fault in faults {
        tokio::time::sleep(secs(1)).await; // some work before each fault
        match fault {
            Fault::KillMember(i) => {
                cluster.kill(i);
                tokio::time::sleep(secs(2)).await;
                cluster.restart(i).await;
            }
            Fault::KillLeader => {
                let leader = within(secs(10), wait_for_leader(cluster)).await;
                cluster.kill(leader);
                tokio::time::sleep(secs(2)).await;
                cluster.restart(leader).await;
            }
            Fault::PauseLeader(pause) => {
                let leader = within(secs(10), wait_for_leader(cluster)).await;
                cluster.pause(leader);
                tokio::time::sleep(pause).await;
                cluster.resume(leader);
            }
            Fault::IsolateLeader(cut) => {
                let leader = within(secs(10), wait_for_leader(cluster)).await;
                let before = progress();
                cluster.isolate(leader);
                tokio::time::sleep(cut).await;
                // The two others are a majority, but a request stuck on the old leader
                // waits for its own timeout (the workloads' plain etcd-client calls do
                // not send it again), so a workload may do nothing during a short cut.
                let during = progress() - before;
                report.push(format!("{fault:?}: {during} steps during the cut"));
                cluster.rejoin(leader);
            }
            Fault::CutOff(cut) => {
                let isolation = isolation.expect("a CutOff fault needs an isolated client");
                isolation.cut();
                tokio::time::sleep(cut).await;
                isolation.heal();
            }
        }
        let healed = Instant::now();
        let before = progress();
        within(secs(30), async {
            while progress() < before + steps {
                tokio::time::sleep(millis(20)).await;
            }
        })
        .await;
        report.push(format!(
            "{fault:?}: {steps} steps within {:?} after healing",
            healed.elapsed()
        ));
    }
    report
}

async fn wait_for_leader(cluster: &EtcdCluster) -> usize {
    loop {
        if let Some(leader) = cluster.leader().await {
            return leader;
        }
        tokio::time::sleep(millis(50)).await;
    }
}
