//! Tests of the test kit itself: clusters that start, die, pause and restart, and the
//! proxy that cuts one client off.

mod common;

use common::{millis, secs, within};
use etcd_client::Client;
use etcd_concurrency::testing::{EtcdCluster, Proxy};

async fn client_of(endpoint: String) -> Client {
    Client::connect([endpoint], None).await.unwrap()
}

#[tokio::test]
async fn a_single_member_serves_reads_and_writes() {
    let cluster = EtcdCluster::start(1).await;
    assert_eq!(cluster.endpoints().len(), 1);
    let mut client = cluster.client().await;
    client.put("k", "v", None).await.unwrap();
    let answer = client.get("k", None).await.unwrap();
    assert_eq!(answer.kvs()[0].value(), b"v");
    assert_eq!(cluster.leader().await, Some(0));
}

#[tokio::test]
async fn three_members_keep_quorum_when_one_dies_and_it_catches_up_on_restart() {
    let cluster = EtcdCluster::start(3).await;
    assert_eq!(cluster.len(), 3);
    cluster.kill(1);
    assert_eq!(cluster.pid(1), None);
    let mut survivor = client_of(cluster.endpoint(0)).await;
    // If the dead member led raft, a write in flight fails until a new leader is elected
    // (etcd answers "request timed out" after 6 s); the two others must then accept it.
    within(secs(20), async {
        while let Err(error) = survivor.put("written-while-down", "yes", None).await {
            eprintln!("write while a member is down failed, retrying: {error}");
        }
    })
    .await;
    let mut dead = client_of(cluster.endpoint(1)).await;
    assert!(dead.get("written-while-down", None).await.is_err());

    cluster.restart(1).await;
    let answer = within(secs(10), dead.get("written-while-down", None))
        .await
        .unwrap();
    assert_eq!(answer.kvs()[0].value(), b"yes");
}

/// The kit's health check reads without credentials: with authentication on, etcd
/// refuses that read, but only once it could serve it, so a restart still completes.
#[tokio::test]
async fn a_member_restarts_with_authentication_on() {
    let cluster = EtcdCluster::start(1).await;
    let mut admin = cluster.client().await;
    admin.user_add("root", "secret", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    cluster.kill(0);
    cluster.restart(0).await;
    let options = etcd_client::ConnectOptions::new().with_user("root", "secret");
    let mut root = Client::connect(cluster.endpoints(), Some(options))
        .await
        .unwrap();
    root.put("k", "v", None).await.unwrap();
}

#[tokio::test]
async fn a_member_that_died_on_its_own_has_no_pid() {
    let cluster = EtcdCluster::start(1).await;
    let pid = cluster.pid(0).expect("running");
    // SAFETY: the pid is the cluster's own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    within(secs(5), async {
        while cluster.pid(0).is_some() {
            tokio::time::sleep(millis(10)).await;
        }
    })
    .await;
    cluster.restart(0).await;
    assert_ne!(cluster.pid(0), None);
}

#[tokio::test]
async fn the_raft_leader_can_be_found_and_replaced() {
    let cluster = EtcdCluster::start(3).await;
    let leader = within(secs(5), cluster.leader()).await.expect("a leader");
    cluster.kill(leader);
    let new_leader = within(secs(10), async {
        loop {
            if let Some(i) = cluster.leader().await {
                return i;
            }
            tokio::time::sleep(millis(50)).await;
        }
    })
    .await;
    assert_ne!(new_leader, leader);
}

#[tokio::test]
async fn an_isolated_member_loses_its_leader_while_the_others_go_on_and_catches_up_on_rejoining() {
    let cluster = EtcdCluster::start(3).await;
    // The leader: it must step down as well as miss what the others write.
    let isolated = within(secs(5), cluster.leader()).await.expect("a leader");
    cluster.isolate(isolated);
    let mut majority = client_of(cluster.endpoint((isolated + 1) % 3)).await;
    within(secs(20), async {
        while let Err(error) = majority.put("written-while-isolated", "yes", None).await {
            eprintln!("write while a member is isolated failed, retrying: {error}");
            tokio::time::sleep(millis(50)).await;
        }
    })
    .await;
    let mut cut_off = client_of(cluster.endpoint(isolated)).await;
    within(secs(10), until_leader_known(&mut cut_off, false)).await;
    let serializable = Some(etcd_client::GetOptions::new().with_serializable());
    let seen = cut_off.get("written-while-isolated", serializable.clone());
    assert!(seen.await.unwrap().kvs().is_empty(), "raft passed the cut");
    // Nor does anything pass the other way, though the isolated member campaigns every
    // 0.5-1 s.
    let members = majority.member_list().await.unwrap();
    let endpoint = cluster.endpoint(isolated);
    let id = members
        .members()
        .iter()
        .find(|m| m.client_urls().contains(&endpoint))
        .expect("the isolated member in the list")
        .id();
    let other = cluster.endpoint((isolated + 1) % 3);
    let received = common::peer_bytes_received(&other, id).await;
    tokio::time::sleep(millis(1_500)).await;
    let later = common::peer_bytes_received(&other, id).await;
    assert_eq!(later, received, "raft messages passed the cut");

    cluster.rejoin(isolated);
    within(secs(20), until_leader_known(&mut cut_off, true)).await;
    let answer = within(secs(10), cut_off.get("written-while-isolated", None))
        .await
        .unwrap();
    assert_eq!(answer.kvs()[0].value(), b"yes");
}

/// Waits until the member `client` is connected to knows a leader (`known`), or knows none.
async fn until_leader_known(client: &mut Client, known: bool) {
    loop {
        match client.status().await {
            Ok(status) if (status.leader() != 0) == known => return,
            Ok(_) => {}
            Err(error) => eprintln!("status failed, retrying: {error}"),
        }
        tokio::time::sleep(millis(50)).await;
    }
}

#[tokio::test]
async fn a_paused_member_answers_nothing_until_resumed() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    client.put("k", "v", None).await.unwrap();
    cluster.pause(0);
    let stalled = tokio::time::timeout(millis(500), client.get("k", None)).await;
    assert!(
        stalled.is_err(),
        "a paused member must not answer: {stalled:?}"
    );
    cluster.resume(0);
    let answer = within(secs(5), client.get("k", None)).await.unwrap();
    assert_eq!(answer.kvs().len(), 1);
}

#[tokio::test]
async fn dropping_the_cluster_stops_every_process() {
    let cluster = EtcdCluster::start(3).await;
    let pids: Vec<u32> = (0..3).map(|i| cluster.pid(i).unwrap()).collect();
    cluster.pause(2); // a stopped process must be killed too
    drop(cluster);
    for pid in pids {
        // SAFETY: signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
        assert!(!alive, "etcd process {pid} survived the cluster");
    }
}

#[tokio::test]
async fn data_left_by_a_killed_process_is_deleted_when_a_cluster_starts() {
    // The id of a process that has exited and been reaped.
    let gone = std::process::Command::new("true").spawn().unwrap();
    let pid = gone.id();
    let mut gone = gone;
    gone.wait().unwrap();
    let parent = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let orphan = parent.join(format!("etcd-test-{pid}-left"));
    std::fs::create_dir_all(orphan.join("member/wal")).unwrap();
    let ours = parent.join(format!("etcd-test-{}-kept", std::process::id()));
    std::fs::create_dir_all(&ours).unwrap();
    let cluster = EtcdCluster::start(1).await;
    assert!(!orphan.exists(), "{} was left", orphan.display());
    assert!(ours.exists(), "a running process's data was deleted");
    std::fs::remove_dir_all(ours).unwrap();
    drop(cluster);
}

#[tokio::test]
async fn the_proxy_cuts_and_heals_one_client() {
    let cluster = EtcdCluster::start(1).await;
    let proxy = Proxy::start(&cluster.endpoint(0)).await.unwrap();
    let mut through_proxy = client_of(proxy.endpoint()).await;
    through_proxy.put("k", "v", None).await.unwrap();

    proxy.cut();
    let cut = tokio::time::timeout(secs(2), through_proxy.get("k", None)).await;
    assert!(
        !matches!(cut, Ok(Ok(_))),
        "a cut client must not reach etcd"
    );
    let mut direct = cluster.client().await;
    direct.put("k", "v2", None).await.unwrap();

    proxy.heal();
    let healed = within(secs(10), async {
        loop {
            if let Ok(answer) = through_proxy.get("k", None).await {
                return answer;
            }
            tokio::time::sleep(millis(50)).await;
        }
    })
    .await;
    assert_eq!(healed.kvs()[0].value(), b"v2");
}

#[tokio::test]
async fn a_stalled_proxy_holds_requests_until_healed() {
    let cluster = EtcdCluster::start(1).await;
    let proxy = Proxy::start(&cluster.endpoint(0)).await.unwrap();
    let client = client_of(proxy.endpoint()).await;
    client.clone().put("the-held-key", "v", None).await.unwrap();

    proxy.stall();
    let mut held = client.clone();
    let request = tokio::spawn(async move { held.get("the-held-key", None).await });
    within(secs(5), proxy.until_holding(b"the-held-key")).await;
    tokio::time::sleep(millis(500)).await;
    assert!(
        !request.is_finished(),
        "a stalled request must not complete"
    );
    proxy.heal();
    let answer = within(secs(5), request).await.unwrap().unwrap();
    assert_eq!(answer.kvs()[0].value(), b"v");
    // Only what was sent since the last stall counts.
    proxy.stall();
    let stale = tokio::time::timeout(millis(300), proxy.until_holding(b"the-held-key"));
    assert!(stale.await.is_err(), "a request held before the last stall");
    proxy.heal();
}

#[tokio::test]
async fn a_connection_cut_is_closed_even_when_healed_at_once() {
    // An echo server as the target: the connection's fate is seen without etcd's retries.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (target, _) = echo_server().await;
    let proxy = Proxy::start(&target).await.unwrap();
    let mut connection = connect_through(&proxy).await;
    let mut byte = [0u8; 1];
    connection.write_all(b"a").await.unwrap();
    connection.read_exact(&mut byte).await.unwrap();

    proxy.cut();
    proxy.heal(); // before the connection's task ran
    let after = within(secs(5), async {
        connection.write_all(b"b").await?;
        connection.read_exact(&mut byte).await
    })
    .await;
    assert!(after.is_err(), "a cut connection was still forwarded");
}

#[test]
fn a_cluster_shared_between_test_threads_outlives_the_thread_that_started_it() {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    // Started on one thread, as by the first test to need it; that thread then ends, and
    // its runtime with it.
    let cluster = std::thread::spawn(move || runtime().block_on(EtcdCluster::start(3)))
        .join()
        .unwrap();
    // No event says that a signal did not come: give one time to land.
    std::thread::sleep(millis(500));
    for i in 0..3 {
        let pid = cluster.pid(i);
        assert!(
            pid.is_some(),
            "member {i} died with the thread that started it"
        );
    }
    // Also the links between the members live on: a write needs a majority.
    runtime().block_on(async {
        let mut client = cluster.client().await;
        within(secs(5), client.put("k", "v", None)).await.unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_proxy_holds_its_sender_back() {
    use tokio::io::AsyncWriteExt;
    // A peer that accepts and never reads.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}", sink.local_addr().unwrap());
    let _peer = tokio::spawn(async move {
        let _connection = sink.accept().await;
        std::future::pending::<()>().await
    });
    let proxy = Proxy::start(&target).await.unwrap();
    proxy.stall();
    let mut sender = connect_through(&proxy).await;
    const LIMIT: usize = 64 << 20;
    let chunk = vec![0u8; 1 << 20];
    let mut accepted = 0;
    while accepted < LIMIT {
        match tokio::time::timeout(secs(2), sender.write_all(&chunk)).await {
            Ok(Ok(())) => accepted += chunk.len(),
            _ => break,
        }
    }
    // What the proxy queues, plus the sockets' buffers: a few MiB, not all that was sent.
    assert!(accepted < LIMIT, "the proxy took {} MiB", accepted >> 20);
}

/// A TCP connection to `proxy`'s port.
async fn connect_through(proxy: &Proxy) -> tokio::net::TcpStream {
    let address = proxy.endpoint().trim_start_matches("http://").to_owned();
    tokio::net::TcpStream::connect(address).await.unwrap()
}

/// An echo server on a free loopback port, as a proxy's target: its address, and a
/// receiver of one message per connection it accepts.
async fn echo_server() -> (String, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = echo.local_addr().unwrap().to_string();
    let (accepted, accepts) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = echo.accept().await {
            let _ = accepted.send(());
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    (target, accepts)
}

#[tokio::test]
async fn a_client_that_half_closes_still_gets_the_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (target, _) = echo_server().await;
    let proxy = Proxy::start(&target).await.unwrap();
    let mut connection = connect_through(&proxy).await;
    connection.write_all(b"hello").await.unwrap();
    connection.shutdown().await.unwrap(); // FIN: nothing more to send
    let mut answer = Vec::new();
    within(secs(5), connection.read_to_end(&mut answer))
        .await
        .unwrap();
    assert_eq!(answer, b"hello");
}

#[tokio::test]
async fn a_stalled_proxy_connects_new_clients_to_the_target_only_once_healed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (target, mut accepts) = echo_server().await;
    let proxy = Proxy::start(&target).await.unwrap();
    proxy.stall();
    let mut connection = connect_through(&proxy).await;
    connection.write_all(b"a").await.unwrap();
    assert!(
        tokio::time::timeout(millis(300), accepts.recv())
            .await
            .is_err(),
        "a stalled proxy connected to the target"
    );
    proxy.heal();
    within(secs(5), async { accepts.recv().await.ok_or("no accept") })
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    within(secs(5), connection.read_exact(&mut byte))
        .await
        .unwrap();
    assert_eq!(&byte, b"a", "the byte sent while stalled was delivered");
}

#[test]
#[should_panic(expected = "IO is disabled")]
fn a_cluster_on_a_runtime_without_its_io_driver_fails_at_once() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(EtcdCluster::start(1));
}

/// Set in the copy of this test binary that `a_cluster_starts_when_dev_shm_is_small` runs
/// in a mount namespace of its own.
const SMALL_SHM: &str = "TESTING_KIT_SMALL_SHM";

/// Docker gives a container a 64 MiB `/dev/shm` unless told otherwise, and each etcd
/// member preallocates 128 MB of write-ahead log (its current 64 MB segment and the next).
/// The kit must then keep the data elsewhere rather than fail to start. Runs this test
/// again in a user and mount namespace with a 64 MiB tmpfs on `/dev/shm` (skipped where
/// `unshare -rm` is not allowed).
#[test]
fn a_cluster_starts_when_dev_shm_is_small() {
    if std::env::var_os(SMALL_SHM).is_some() {
        return three_members_start_and_serve(secs(60));
    }
    let probe = std::process::Command::new("unshare")
        .args([
            "-rm",
            "sh",
            "-c",
            "mount -t tmpfs -o size=64m tmpfs /dev/shm",
        ])
        .output();
    if !probe.is_ok_and(|output| output.status.success()) {
        eprintln!("skipped: `unshare -rm` cannot mount a tmpfs here");
        return;
    }
    let test = std::env::current_exe().unwrap();
    // Bounded (the child bounds its own waits; this bounds a child stuck all the same).
    let output = std::process::Command::new("timeout")
        .args(["120", "unshare", "-rm", "sh", "-c"])
        .arg(
            "mount -t tmpfs -o size=64m tmpfs /dev/shm && exec \"$0\" --exact \
             a_cluster_starts_when_dev_shm_is_small --test-threads=1 --nocapture",
        )
        .arg(test)
        .env(SMALL_SHM, "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert_passed(&output, "no cluster with a 64 MiB /dev/shm");
}

/// Set in the copy of this test binary that
/// `a_cluster_starts_again_when_two_members_lose_their_ports` runs.
const TWO_PORTS_TAKEN: &str = "TESTING_KIT_TWO_PORTS_TAKEN";

/// When two members of three cannot bind their ports (taken by another process between
/// the kit's choice and etcd's bind), the third waits for a quorum that never comes; the
/// kit must see the two exit and start again on fresh ports, as it does when one member
/// loses its port. `ETCD_BIN` is a script that fails members m1 and m2 once each as etcd
/// fails on a taken port, set only in a copy of this test binary (it is process-wide).
#[test]
fn a_cluster_starts_again_when_two_members_lose_their_ports() {
    if std::env::var_os(TWO_PORTS_TAKEN).is_some() {
        return three_members_start_and_serve(secs(20));
    }
    let etcd = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("etcd"))
        .find(|path| path.is_file())
        .expect("etcd on PATH");
    let scratch = tempfile::tempdir().unwrap();
    let wrapper = scratch.path().join("etcd");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             for arg in \"$@\"; do [ \"$previous\" = --name ] && name=$arg; previous=$arg; done\n\
             if [ \"$name\" != m0 ] && mkdir \"{dir}/failed-$name\" 2>/dev/null; then\n\
             echo \"listen tcp 127.0.0.1:1: bind: address already in use\" >&2; exit 1\n\
             fi\n\
             exec {etcd} \"$@\"\n",
            dir = scratch.path().display(),
            etcd = etcd.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let test = "a_cluster_starts_again_when_two_members_lose_their_ports";
    let env = [
        (TWO_PORTS_TAKEN, "1".as_ref()),
        ("ETCD_BIN", wrapper.as_os_str()),
    ];
    assert_passed(&run_copy(test, &env), "the cluster did not start again");
}

/// Runs `test` alone in a copy of this test binary, with `env` set, within 120 s; the
/// harness there captures the test's output, and shows it if the test fails.
fn run_copy(test: &str, env: &[(&str, &std::ffi::OsStr)]) -> std::process::Output {
    std::process::Command::new("timeout")
        .arg("120")
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--test-threads=1"])
        .envs(env.iter().copied())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// What a copy of this test binary checks (on a runtime of its own): a 3-member cluster
/// starts within `limit` and takes a write.
fn three_members_start_and_serve(limit: std::time::Duration) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let cluster = within(limit, EtcdCluster::start(3)).await;
        let mut client = cluster.client().await;
        within(secs(5), client.put("k", "v", None)).await.unwrap();
    });
}

/// Asserts that a copy of this test binary passed, or fails with `failure` and what it
/// printed (but the etcd members' JSON log lines).
fn assert_passed(output: &std::process::Output, failure: &str) {
    let said = said(output);
    let tail: Vec<&str> = said.lines().filter(|l| !l.starts_with('{')).collect();
    assert!(output.status.success(), "{failure}:\n{}", tail.join("\n"));
}

/// Set in the copy of this test binary that
/// `a_failing_test_shows_the_end_of_each_members_log` runs, where the test fails on purpose.
const FAIL_ON_PURPOSE: &str = "TESTING_KIT_FAIL_ON_PURPOSE";

/// A test that fails while it holds a cluster shows, with its failure, what each member
/// logged last, before the logs go with the data.
#[test]
fn a_failing_test_shows_the_end_of_each_members_log() {
    if std::env::var_os(FAIL_ON_PURPOSE).is_some() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _cluster = runtime.block_on(within(secs(60), EtcdCluster::start(3)));
        panic!("failing on purpose");
    }
    let test = "a_failing_test_shows_the_end_of_each_members_log";
    let said = said(&run_copy(test, &[(FAIL_ON_PURPOSE, "1".as_ref())]));
    assert!(said.contains("failing on purpose"), "{said}");
    let lines: Vec<&str> = said.lines().collect();
    for i in 0..3 {
        let header = format!("--- last lines of the log of member {i} (m{i}) ---");
        let at = lines.iter().position(|line| *line == header);
        let first = at.and_then(|at| lines.get(at + 1));
        assert!(
            first.is_some_and(|line| line.starts_with("{\"level\"")),
            "no log of member {i} after the failure:\n{said}"
        );
    }
}

/// What a copy of this test binary printed, stdout then stderr.
fn said(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}
