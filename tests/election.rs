//! Election, Leadership and observe against real etcd.

mod common;

use std::pin::{Pin, pin};
use std::time::{Duration, Instant};

use common::{
    Deletion, Etcdctl, THROUGH_TWO_PATHS, a_late_join_leaves_no_key, appears, exists, hex_key,
    holds, keys_under, millis, proposals_applied, proposals_applied_exceed, read, secs,
    two_path_session, unique, within,
};
use etcd_client::{Client, CompactionOptions, ResignOptions, Txn, TxnOp, WatchOptions};
use etcd_concurrency::testing::{EtcdCluster, Proxy};
use etcd_concurrency::{Election, Error, Leader, Leadership, Observe, Session};
use futures::StreamExt;
use tokio::task::JoinHandle;

async fn session(client: &Client, ttl: u64) -> Session {
    Session::builder(client.clone())
        .ttl(secs(ttl))
        .build()
        .await
        .unwrap()
}

/// `election.campaign(value)` in a task of its own, to await or to cancel.
fn spawn_campaign(
    election: &Election,
    value: impl Into<Vec<u8>>,
) -> JoinHandle<etcd_concurrency::Result<Leadership>> {
    let (election, value) = (election.clone(), value.into());
    tokio::spawn(async move { election.campaign(value).await })
}

/// Spawns `election.campaign(value)` while `proxy` stalls, waits until its join Txn (which
/// carries `value`, to be told from other requests) is held in the proxy, and cancels the
/// campaign.
async fn cancel_a_campaign_whose_join_is_held(proxy: &Proxy, election: &Election, value: &str) {
    proxy.stall();
    let campaign = spawn_campaign(election, value);
    within(secs(5), proxy.until_holding(value.as_bytes())).await;
    campaign.abort();
    assert!(campaign.await.unwrap_err().is_cancelled());
}

/// Another session's campaign in an election, queued behind the leader.
struct Candidate {
    campaign: JoinHandle<etcd_concurrency::Result<Leadership>>,
    key: Vec<u8>,
}

impl Candidate {
    /// Asserts that the candidate is elected within `limit`, which ends `sibling` (a
    /// leadership sharing the resigned key), then resigns.
    async fn wins_ending(self, sibling: Leadership, limit: Duration) {
        let elected = within(limit, self.campaign).await.unwrap().unwrap();
        assert_eq!(elected.key(), self.key.as_slice());
        within(secs(5), sibling.lost()).await;
        drop(sibling);
        within(secs(5), elected.resign()).await.unwrap();
    }
}

/// Two leaderships of `leader` in election `name`, sharing its key, and the campaign of
/// another session, queued behind them.
async fn two_leaderships_and_a_candidate(
    client: &Client,
    leader: &Session,
    name: &str,
) -> (Leadership, Leadership, Candidate) {
    let election = Election::new(leader, name);
    let first = within(secs(10), election.campaign("a")).await.unwrap();
    let second = within(secs(10), election.campaign("a")).await.unwrap();
    let other = session(client, 30).await;
    let campaign = spawn_campaign(&Election::new(&other, name), "next");
    let key = hex_key(name, &other);
    within(secs(5), appears(client, &key)).await;
    (first, second, Candidate { campaign, key })
}

/// The next leader an observer reports, within 5 s.
async fn next_leader(observer: &mut Observe) -> Option<Leader> {
    within(secs(5), observer.next())
        .await
        .expect("observe never ends")
        .expect("observe")
}

/// The create revision of `key`, if it exists.
async fn create_revision(client: &Client, key: &[u8]) -> Option<i64> {
    let answer = read(client, key, None).await;
    answer.kvs().first().map(|kv| kv.create_revision())
}

/// An election led with the value `first`, observed through a proxy that can cut the
/// observer off.
struct Observed {
    _cluster: EtcdCluster,
    /// Connected to the member directly.
    client: Client,
    proxy: Proxy,
    leading: Leadership,
    _watcher: Session,
    observer: Observe,
}

/// Starts a one-member cluster and returns once the observer has reported `first`.
async fn observed_through_a_proxy(name: &str, first: &str) -> Observed {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let (proxy, cut_off) = common::behind_proxy(&cluster.endpoint(0)).await;
    let (leader, watcher) = (session(&client, 10).await, session(&cut_off, 30).await);
    let leading = within(secs(10), Election::new(&leader, name).campaign(first))
        .await
        .unwrap();
    let mut observer = Election::new(&watcher, name).observe();
    assert_eq!(
        value_of(&next_leader(&mut observer).await).as_deref(),
        Some(first)
    );
    Observed {
        _cluster: cluster,
        client,
        proxy,
        leading,
        _watcher: watcher,
        observer,
    }
}

fn value_of(leader: &Option<Leader>) -> Option<String> {
    leader
        .as_ref()
        .map(|l| String::from_utf8(l.value().to_vec()).unwrap())
}

#[tokio::test]
async fn leadership_passes_on_resign_and_observe_shows_every_step() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("handoff");
    let (a, b) = (session(&client, 10).await, session(&client, 10).await);
    let watcher = session(&client, 10).await;
    let mut observer = Election::new(&watcher, &name).observe();
    assert_eq!(next_leader(&mut observer).await, None, "nobody leads yet");

    let leading_a = within(secs(10), Election::new(&a, &name).campaign("a"))
        .await
        .unwrap();
    assert_eq!(
        value_of(&next_leader(&mut observer).await).as_deref(),
        Some("a")
    );
    leading_a.proclaim("a2").await.unwrap();
    let proclaimed = next_leader(&mut observer).await.expect("a leads");
    assert_eq!(proclaimed.value(), b"a2");
    // The same value again is reported too, as Go's Observe does: a heartbeat.
    leading_a.proclaim("a2").await.unwrap();
    let again = next_leader(&mut observer).await.expect("a leads");
    assert_eq!(again.value(), b"a2");
    assert!(again.mod_revision() > proclaimed.mod_revision());
    assert_eq!(again.create_revision(), leading_a.fencing_token());

    let mut campaign_b = spawn_campaign(&Election::new(&b, &name), "b");
    within(secs(5), appears(&client, &hex_key(&name, &b))).await;
    let early = tokio::time::timeout(millis(300), &mut campaign_b).await;
    assert!(early.is_err(), "a leads: b must wait");
    let token_a = leading_a.fencing_token();
    leading_a.resign().await.unwrap();
    let leading_b = within(secs(5), campaign_b).await.unwrap().unwrap();
    assert!(leading_b.fencing_token() > token_a);
    let seen = next_leader(&mut observer).await.expect("b leads");
    assert_eq!(seen.value(), b"b");
    assert_eq!(seen.key(), leading_b.key());
    assert_eq!(seen.create_revision(), leading_b.fencing_token());
    assert_eq!(seen.lease_id(), b.lease_id());
    let leader = Election::new(&a, &name).leader().await.unwrap().unwrap();
    assert_eq!(leader, seen);
    leading_b.resign().await.unwrap();
    assert_eq!(
        next_leader(&mut observer).await,
        None,
        "nobody leads after the last resign"
    );
}

/// The 2 s lease expires at most 2 s after the crash (its last renewal) and etcd notices
/// within its 500 ms expiry check; the next candidate then leads at once, not at its own
/// next keep-alive (10 s TTL: every 3.3 s). How fast is the benchmark's and the demo's
/// business; here, that it follows the expiry, with room for a loaded machine.
#[tokio::test]
async fn a_crashed_leader_is_replaced_once_its_lease_expires() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let name = unique("failover");
    let (a, b) = (session(&client, 2).await, session(&client, 10).await);
    let leading_a = within(secs(10), Election::new(&a, &name).campaign("a"))
        .await
        .unwrap();
    let campaign_b = spawn_campaign(&Election::new(&b, &name), "b");
    within(secs(5), appears(&client, &hex_key(&name, &b))).await;
    assert!(!campaign_b.is_finished(), "b led before the crash");
    let lease_a = a.lease_id();
    std::mem::forget(leading_a); // a crash: no resign
    a.orphan(); // and no revoke: the lease must expire
    let leading_b = within(secs(6), campaign_b).await.unwrap().unwrap();
    let left = client.lease_time_to_live(lease_a, None).await.unwrap();
    assert_eq!(left.ttl(), -1, "b leads while a's lease lives");
    assert_eq!(
        Election::new(&b, &name)
            .leader()
            .await
            .unwrap()
            .unwrap()
            .key(),
        leading_b.key()
    );
}

#[tokio::test]
async fn a_candidate_whose_lease_dies_gets_session_lost_not_leadership() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let name = unique("dead-candidate");
    let (a, b) = (session(&client, 10).await, session(&client, 10).await);
    let leading_a = within(secs(10), Election::new(&a, &name).campaign("a"))
        .await
        .unwrap();
    let campaign_b = spawn_campaign(&Election::new(&b, &name), "b");
    within(secs(5), appears(&client, &hex_key(&name, &b))).await;
    client.lease_revoke(b.lease_id()).await.unwrap();
    let result = within(secs(5), campaign_b).await.unwrap();
    assert!(matches!(result, Err(Error::SessionLost)), "{result:?}");
    leading_a.resign().await.unwrap();
    assert!(
        keys_under(&client, &format!("{name}/")).await.is_empty(),
        "no phantom leader"
    );
}

#[tokio::test]
async fn observe_replays_changes_missed_while_cut_off_and_survives_compaction() {
    let Observed {
        mut client,
        proxy,
        leading,
        mut observer,
        _cluster,
        _watcher,
    } = observed_through_a_proxy(&unique("observe-cut"), "v1").await;

    // Missed while cut off, then replayed from the last revision seen + 1.
    proxy.cut();
    leading.proclaim("v2").await.unwrap();
    leading.proclaim("v3").await.unwrap();
    proxy.heal();
    assert_eq!(
        value_of(&next_leader(&mut observer).await).as_deref(),
        Some("v2")
    );
    assert_eq!(
        value_of(&next_leader(&mut observer).await).as_deref(),
        Some("v3")
    );

    // Missed and compacted away: the election is read again.
    proxy.cut();
    leading.proclaim("v4").await.unwrap();
    leading.proclaim("v5").await.unwrap();
    compact_all(&mut client).await;
    proxy.heal();
    assert_eq!(
        value_of(&next_leader(&mut observer).await).as_deref(),
        Some("v5")
    );
    leading.proclaim("v6").await.unwrap();
    assert_eq!(
        value_of(&next_leader(&mut observer).await).as_deref(),
        Some("v6")
    );
}

#[tokio::test]
async fn observe_reads_the_election_when_the_changes_it_missed_are_too_large_to_replay() {
    let Observed {
        client: _,
        proxy,
        leading,
        mut observer,
        _cluster,
        _watcher,
    } = observed_through_a_proxy(&unique("observe-large"), "small").await;
    // Three values of 1.4 MiB missed: replayed, they would come as one answer of 4.2 MiB,
    // over the client's 4 MiB limit.
    proxy.cut();
    for fill in [b'x', b'y', b'z'] {
        leading.proclaim(vec![fill; 1400 * 1024]).await.unwrap();
    }
    proxy.heal();
    let latest = within(secs(15), async {
        loop {
            let leader = next_leader(&mut observer).await.expect("a leader");
            if leader.value().first() == Some(&b'z') {
                return leader;
            }
        }
    })
    .await;
    assert_eq!(latest.value().len(), 1400 * 1024);
    leading.resign().await.unwrap();
}

#[tokio::test]
async fn observe_reads_candidates_whose_values_are_too_large_for_one_answer() {
    // Three values of 1.4 MiB: read in one answer, they would take 4.2 MiB, over the
    // client's 4 MiB limit.
    const SIZE: usize = 1400 * 1024;
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("observe-large-candidates");
    let sessions = [
        session(&client, 30).await,
        session(&client, 30).await,
        session(&client, 30).await,
    ];
    let election = Election::new(&sessions[0], &name);
    let leading = within(secs(10), election.campaign(vec![b'a'; SIZE]))
        .await
        .unwrap();
    let mut waiting = Vec::new();
    for (candidate, fill) in sessions[1..].iter().zip([b'b', b'c']) {
        waiting.push(spawn_campaign(
            &Election::new(candidate, &name),
            vec![fill; SIZE],
        ));
        within(secs(5), appears(&client, &hex_key(&name, candidate))).await;
    }

    let mut observer = election.observe();
    let first = next_leader(&mut observer).await.expect("a leader");
    assert_eq!(first.value(), vec![b'a'; SIZE].as_slice());
    leading.resign().await.unwrap();
    let second = next_leader(&mut observer).await.expect("a leader");
    assert_eq!(second.value(), vec![b'b'; SIZE].as_slice());
    let next = within(secs(5), waiting.remove(0)).await.unwrap().unwrap();
    next.resign().await.unwrap();
    let third = next_leader(&mut observer).await.expect("a leader");
    assert_eq!(third.value(), vec![b'c'; SIZE].as_slice());
}

#[tokio::test]
async fn observe_and_leader_agree_on_candidates_one_txn_created() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let name = unique("tie");
    let watcher = session(&client, 10).await;
    // Candidates with one create revision; more of them later, which cannot lead.
    let candidate = |suffix: &str| TxnOp::put(format!("{name}/{suffix}"), suffix, None);
    let tied = Txn::new().and_then([candidate("b"), candidate("a"), candidate("c")]);
    client.txn(tied).await.unwrap();
    let election = Election::new(&watcher, &name);
    let leader = election.leader().await.unwrap().expect("a leader");
    assert_eq!(leader.key(), format!("{name}/a").as_bytes());
    let mut observers: Vec<_> = (0..10).map(|_| election.observe()).collect();
    for observer in &mut observers {
        assert_eq!(next_leader(observer).await.as_ref(), Some(&leader));
    }
    for later in 0..40 {
        client
            .put(format!("{name}/later-{later}"), "", None)
            .await
            .unwrap();
    }
    // The first change the observers report is the leader's new value.
    client.put(leader.key(), "a2", None).await.unwrap();
    for observer in &mut observers {
        let change = next_leader(observer).await.expect("a leader");
        assert_eq!(
            (change.key(), change.value()),
            (leader.key(), b"a2".as_slice())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_survives_the_death_of_each_member_in_turn() {
    let cluster = EtcdCluster::start(3).await;
    let name = unique("observe-kill");
    let watcher = session(&cluster.client().await, 30).await;
    let mut observer = Election::new(&watcher, &name).observe();
    assert_eq!(next_leader(&mut observer).await, None);
    let writer = session(&cluster.client().await, 30).await;
    let leading = within(secs(10), Election::new(&writer, &name).campaign("0"))
        .await
        .unwrap();
    assert_eq!(
        value_of(&next_leader(&mut observer).await).as_deref(),
        Some("0")
    );
    for member in 0..3 {
        cluster.kill(member);
        let value = format!("{}", member + 1);
        within(secs(10), leading.proclaim(value.clone()))
            .await
            .unwrap();
        let seen = within(secs(10), observer.next()).await.unwrap().unwrap();
        assert_eq!(value_of(&seen), Some(value));
        cluster.restart(member).await;
    }
}

#[tokio::test]
async fn etcdctl_elect_and_our_election_see_each_other() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("etcdctl-elect");
    let ours = session(&client, 10).await;
    let election = Election::new(&ours, &name);

    let mut theirs = Etcdctl::spawn(&cluster.endpoints(), &["elect", &name, "their-proposal"]);
    let their_key = within(secs(10), theirs.next_line())
        .await
        .expect("etcdctl leads");
    assert!(their_key.starts_with(&format!("{name}/")), "{their_key}");
    let leader = election.leader().await.unwrap().expect("etcdctl leads");
    assert_eq!(leader.value(), b"their-proposal");
    assert_eq!(leader.key(), their_key.as_bytes());
    let mut campaign = spawn_campaign(&election, "our-proposal");
    within(secs(5), appears(&client, &hex_key(&name, &ours))).await;
    let early = tokio::time::timeout(millis(300), &mut campaign).await;
    assert!(early.is_err(), "etcdctl leads: we must wait");
    theirs.interrupt().await;
    let leading = within(secs(5), campaign).await.unwrap().unwrap();

    let mut listener = Etcdctl::spawn(&cluster.endpoints(), &["elect", "-l", &name]);
    let key = within(secs(10), listener.next_line()).await.unwrap();
    let value = within(secs(5), listener.next_line()).await.unwrap();
    assert_eq!(key.as_bytes(), leading.key());
    assert_eq!(value, "our-proposal");
    leading.proclaim("proclaimed").await.unwrap();
    let _key = within(secs(5), listener.next_line()).await.unwrap();
    assert_eq!(
        within(secs(5), listener.next_line()).await.unwrap(),
        "proclaimed"
    );

    // An etcdctl candidate waits behind us, and leads once we resign.
    let prefix = format!("{name}/");
    let options = WatchOptions::new().with_prefix();
    let mut joins = client
        .clone()
        .watch(prefix.as_str(), Some(options))
        .await
        .expect("watch");
    let mut second = Etcdctl::spawn(&cluster.endpoints(), &["elect", &name, "their-second"]);
    within(secs(10), async {
        while let Some(answer) = joins.message().await.expect("watch") {
            if !answer.events().is_empty() {
                return;
            }
        }
    })
    .await;
    let early = tokio::time::timeout(millis(300), second.next_line()).await;
    assert!(early.is_err(), "etcdctl must wait while we lead");
    leading.resign().await.unwrap();
    let their_key = within(secs(5), second.next_line())
        .await
        .expect("etcdctl leads");
    assert!(their_key.starts_with(&prefix), "{their_key}");
    let leader = election.leader().await.unwrap().expect("etcdctl leads");
    assert_eq!(leader.value(), b"their-second");
    second.interrupt().await;
    listener.interrupt().await;
}

#[tokio::test]
async fn etcd_server_side_election_and_our_election_elect_among_each_other() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let name = unique("election-service");
    let theirs = session(&client, 10).await; // a kept-alive lease for the server-side calls
    let their_key = hex_key(&name, &theirs);
    let ours = session(&client, 10).await;
    let election = Election::new(&ours, &name);

    // They lead; our campaign waits behind them and wins when they resign.
    let answer = client
        .campaign(name.as_str(), "theirs", theirs.lease_id())
        .await
        .unwrap();
    let their_leadership = answer.leader().expect("a leader key").clone();
    assert_eq!(their_leadership.key(), their_key.as_slice());
    let leader = election.leader().await.unwrap().expect("they lead");
    assert_eq!(leader.value(), b"theirs");
    let mut campaign = spawn_campaign(&election, "ours");
    within(secs(5), appears(&client, &hex_key(&name, &ours))).await;
    let early = tokio::time::timeout(millis(300), &mut campaign).await;
    assert!(early.is_err(), "the Election service leads: we must wait");
    let resign = ResignOptions::new().with_leader(their_leadership);
    client.resign(Some(resign)).await.unwrap();
    let leading = within(secs(5), campaign).await.unwrap().unwrap();

    // We lead; the service says so, and its campaign waits until we resign.
    let said = client.leader(name.as_str()).await.unwrap();
    assert_eq!(said.kv().map(|kv| kv.value()), Some(b"ours".as_slice()));
    let (mut their_client, name_for_them) = (client.clone(), name.clone());
    let lease = theirs.lease_id();
    let mut theirs_waits = tokio::spawn(async move {
        their_client
            .campaign(name_for_them.as_str(), "theirs again", lease)
            .await
    });
    within(secs(5), appears(&client, &their_key)).await;
    let early = tokio::time::timeout(millis(300), &mut theirs_waits).await;
    assert!(
        early.is_err(),
        "the Election service must wait while we lead"
    );
    leading.resign().await.unwrap();
    let answer = within(secs(5), theirs_waits).await.unwrap().unwrap();
    let their_leadership = answer.leader().expect("a leader key").clone();
    let leader = election.leader().await.unwrap().expect("they lead again");
    assert_eq!(leader.value(), b"theirs again");
    let resign = ResignOptions::new().with_leader(their_leadership);
    client.resign(Some(resign)).await.unwrap();
    assert!(election.leader().await.unwrap().is_none());
}

#[tokio::test]
async fn campaigning_again_on_one_session_resumes_the_key_with_the_new_value() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("again");
    let ours = session(&client, 10).await;
    let election = Election::new(&ours, &name);
    let first = within(secs(10), election.campaign("first")).await.unwrap();
    let second = within(secs(2), election.campaign("second")).await.unwrap();
    assert_eq!(second.key(), first.key());
    assert_eq!(second.fencing_token(), first.fencing_token());
    let leader = election.leader().await.unwrap().unwrap();
    assert_eq!(leader.value(), b"second");
    second.resign().await.unwrap();
    within(secs(5), first.lost()).await; // they shared the key
    let resigned = within(secs(5), first.resign()).await;
    assert!(
        matches!(resigned, Err(Error::OwnershipLost)),
        "{resigned:?}"
    );
}

#[tokio::test]
async fn leader_is_the_oldest_candidate_not_the_newest() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("leader-of-many");
    let sessions = [
        session(&client, 10).await,
        session(&client, 10).await,
        session(&client, 10).await,
    ];
    let leading = within(
        secs(10),
        Election::new(&sessions[0], &name).campaign("first"),
    )
    .await
    .unwrap();
    let mut waiting = Vec::new();
    for (candidate, value) in sessions[1..].iter().zip(["second", "third"]) {
        waiting.push(spawn_campaign(&Election::new(candidate, &name), value));
        within(secs(5), appears(&client, &hex_key(&name, candidate))).await;
    }
    let leader = Election::new(&sessions[2], &name)
        .leader()
        .await
        .unwrap()
        .expect("someone leads");
    assert_eq!(String::from_utf8_lossy(leader.value()), "first");
    assert_eq!(leader.key(), leading.key());
    assert_eq!(leader.create_revision(), leading.fencing_token());
    leading.resign().await.unwrap();
    let next = within(secs(5), waiting.remove(0)).await.unwrap().unwrap();
    let leader = Election::new(&sessions[0], &name).leader().await.unwrap();
    assert_eq!(leader.expect("someone leads").key(), next.key());
    next.resign().await.unwrap();
    within(secs(5), waiting.remove(0))
        .await
        .unwrap()
        .unwrap()
        .resign()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_proclaim_while_a_candidate_waits_does_not_elect_it() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("proclaim-waiting");
    let (a, b) = (session(&client, 10).await, session(&client, 10).await);
    let leading_a = within(secs(10), Election::new(&a, &name).campaign("a"))
        .await
        .unwrap();
    let mut campaign_b = spawn_campaign(&Election::new(&b, &name), "b");
    within(secs(5), appears(&client, &hex_key(&name, &b))).await;
    // Each proclaim rewrites the leader's key: an event in the queue that b watches, but
    // no change of leader.
    for value in ["a2", "a3", "a4"] {
        leading_a.proclaim(value).await.unwrap();
    }
    within(secs(5), holds(&client, leading_a.key(), b"a4")).await;
    let early = tokio::time::timeout(millis(500), &mut campaign_b).await;
    assert!(
        early.is_err(),
        "b was told it leads while a still does: {early:?}"
    );
    let token_a = leading_a.fencing_token();
    leading_a.resign().await.unwrap();
    let leading_b = within(secs(5), campaign_b).await.unwrap().unwrap();
    assert!(leading_b.fencing_token() > token_a);
    leading_b.resign().await.unwrap();
}

/// A proclaim refused because the key is gone is news of the loss: `is_lost`, `lost` and
/// `while_leading` know it at once, without a watch.
#[tokio::test]
async fn a_proclaim_that_finds_the_key_gone_marks_the_leadership_lost() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let leader = session(&client, 10).await;
    let election = Election::new(&leader, unique("proclaim-lost"));
    let leadership = within(secs(10), election.campaign("a")).await.unwrap();
    assert!(!leadership.is_lost());
    client.delete(leadership.key(), None).await.unwrap();
    let proclaimed = within(secs(5), leadership.proclaim("b")).await;
    assert!(
        matches!(proclaimed, Err(Error::OwnershipLost)),
        "{proclaimed:?}"
    );
    assert!(leadership.is_lost());
    assert!(!leader.is_lost(), "the session itself lives on");
    cluster.pause(0); // nothing left to learn from etcd
    within(millis(100), leadership.lost()).await;
    let work = within(millis(100), leadership.while_leading(async { "ran" })).await;
    cluster.resume(0);
    assert_eq!(work, None, "work started for a leadership known to be lost");
}

#[tokio::test]
async fn a_deposed_leader_can_neither_proclaim_nor_resign() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let name = unique("deposed");
    let (a, b) = (session(&client, 10).await, session(&client, 10).await);
    let deposed = within(secs(10), Election::new(&a, &name).campaign("a"))
        .await
        .unwrap();
    client.delete(deposed.key(), None).await.unwrap();
    within(secs(5), deposed.lost()).await;
    let successor = within(secs(2), Election::new(&b, &name).campaign("b"))
        .await
        .unwrap();
    let proclaimed = within(secs(5), deposed.proclaim("a again")).await;
    assert!(
        matches!(proclaimed, Err(Error::OwnershipLost)),
        "{proclaimed:?}"
    );
    assert!(!exists(&client, deposed.key()).await, "nothing written");
    let resigned = within(secs(5), deposed.resign()).await;
    assert!(
        matches!(resigned, Err(Error::OwnershipLost)),
        "{resigned:?}"
    );
    let leader = Election::new(&b, &name).leader().await.unwrap().unwrap();
    assert_eq!(leader.key(), successor.key());
    assert_eq!(leader.value(), b"b");

    // A leader whose session is lost does not write either.
    let lost = session(&client, 10).await;
    let election = Election::new(&lost, unique("deposed-lost"));
    let leading = within(secs(10), election.campaign("x")).await.unwrap();
    client.lease_revoke(lost.lease_id()).await.unwrap();
    within(secs(2), leading.lost()).await;
    assert!(within(secs(5), leading.proclaim("y")).await.is_err());
    assert_eq!(election.leader().await.unwrap(), None);
}

#[tokio::test]
async fn a_cancelled_campaign_leaves_no_key_and_a_dropped_leadership_resigns() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("cancel-campaign");
    let (a, b) = (session(&client, 10).await, session(&client, 10).await);
    let leading = within(secs(10), Election::new(&a, &name).campaign("a"))
        .await
        .unwrap();
    let campaign = spawn_campaign(&Election::new(&b, &name), "b");
    let b_key = hex_key(&name, &b);
    within(secs(5), appears(&client, &b_key)).await;
    let deletion = Deletion::of(&client, std::str::from_utf8(&b_key).unwrap()).await;
    campaign.abort();
    within(secs(5), deletion.happened()).await;

    let deletion = Deletion::of(&client, std::str::from_utf8(leading.key()).unwrap()).await;
    drop(leading);
    within(secs(5), deletion.happened()).await;
    assert_eq!(Election::new(&a, &name).leader().await.unwrap(), None);
}

#[tokio::test]
async fn while_leading_stops_the_job_when_leadership_is_lost() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let ours = session(&client, 10).await;
    let leading = within(secs(10), Election::new(&ours, unique("job")).campaign("me"))
        .await
        .unwrap();
    let done = leading.while_leading(async { 42 }).await;
    assert_eq!(done, Some(42));
    // Revoked once the job runs: it is stopped while running.
    let (running, started) = tokio::sync::oneshot::channel();
    let job = leading.while_leading(async {
        running.send(()).unwrap();
        std::future::pending::<()>().await
    });
    let revoke = async {
        started.await.unwrap();
        client.lease_revoke(ours.lease_id()).await.unwrap();
    };
    let (stopped, ()) = within(secs(2), futures::future::join(job, revoke)).await;
    assert_eq!(stopped, None);
}

/// A leader-only job must not start, even for a moment, once leadership is known to be
/// lost: `while_leading` looks at `lost()` before it polls the job.
#[tokio::test]
async fn while_leading_never_starts_the_job_after_leadership_was_lost() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let ours = session(&client, 10).await;
    let leading = within(
        secs(10),
        Election::new(&ours, unique("late")).campaign("me"),
    )
    .await
    .unwrap();
    within(secs(5), ours.close()).await.unwrap();
    let mut started = 0;
    for _ in 0..20 {
        let job = async {
            started += 1;
            42
        };
        assert_eq!(within(secs(5), leading.while_leading(job)).await, None);
    }
    assert_eq!(started, 0, "a job started after leadership was lost");
}

#[tokio::test]
async fn bad_names_and_oversized_values_are_refused_and_leave_nothing() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let ours = session(&client, 10).await;
    let empty = Election::new(&ours, "");
    assert!(matches!(
        within(secs(5), empty.campaign("x")).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        within(secs(5), empty.leader()).await,
        Err(Error::InvalidArgument(_))
    ));
    let mut observer = empty.observe();
    let first = within(secs(5), observer.next()).await.unwrap();
    assert!(matches!(first, Err(Error::InvalidArgument(_))));
    assert!(
        within(secs(5), observer.next()).await.is_none(),
        "the stream goes on with an empty name"
    );

    let name = unique("too-large");
    let election = Election::new(&ours, &name);
    let huge = vec![b'x'; 2 * 1024 * 1024];
    let refused = within(secs(10), election.campaign(huge.clone())).await;
    assert!(matches!(&refused, Err(Error::Etcd(_))), "{refused:?}");
    assert!(!refused.unwrap_err().is_transient());
    assert!(keys_under(&client, &format!("{name}/")).await.is_empty());
    let leading = within(secs(10), election.campaign("small")).await.unwrap();
    let refused = within(secs(10), leading.proclaim(huge)).await;
    assert!(matches!(refused, Err(Error::Etcd(_))), "{refused:?}");
    assert_eq!(election.leader().await.unwrap().unwrap().value(), b"small");
    leading.resign().await.unwrap();
}

#[tokio::test]
async fn cancelling_one_of_two_waiting_campaigns_keeps_the_shared_candidacy() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("shared-key");
    let (other, ours) = (session(&client, 10).await, session(&client, 10).await);
    let leading = within(secs(10), Election::new(&other, &name).campaign("other"))
        .await
        .unwrap();
    let election = Election::new(&ours, &name);
    let first = spawn_campaign(&election, "ours");
    let our_key = hex_key(&name, &ours);
    within(secs(5), appears(&client, &our_key)).await;
    // A second campaign of the same session shares the waiting key; cancelling it must
    // not withdraw the first one's candidacy. It is cancelled once etcd has applied its
    // join (a Txn with a put: a raft proposal, whether or not the put is made).
    let applied = proposals_applied(&cluster.endpoint(0)).await;
    let second = spawn_campaign(&election, "ours");
    within(
        secs(5),
        proposals_applied_exceed(&cluster.endpoint(0), applied),
    )
    .await;
    second.abort();
    tokio::time::sleep(millis(300)).await; // a wrongly spawned release would have run
    assert!(
        exists(&client, our_key.as_slice()).await,
        "the shared candidacy was withdrawn"
    );
    leading.resign().await.unwrap();
    let ours_leads = within(secs(5), first).await.unwrap().unwrap();
    assert_eq!(ours_leads.key(), our_key.as_slice());
    ours_leads.resign().await.unwrap();
}

#[tokio::test]
async fn cancelling_the_campaign_that_created_a_shared_key_leaves_it_to_the_other() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("shared-first");
    let (other, ours) = (session(&client, 10).await, session(&client, 10).await);
    let leading = within(secs(10), Election::new(&other, &name).campaign("other"))
        .await
        .unwrap();
    let election = Election::new(&ours, &name);
    let first = spawn_campaign(&election, "first");
    let our_key = hex_key(&name, &ours);
    within(secs(5), holds(&client, &our_key, b"first")).await;
    // The second campaign finds the key the first one created and gives it its value.
    let second = spawn_campaign(&election, "second");
    within(secs(5), holds(&client, &our_key, b"second")).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    leading.resign().await.unwrap();
    let ours_leads = within(secs(5), second).await.unwrap().unwrap();
    assert_eq!(
        create_revision(&client, &our_key).await,
        Some(ours_leads.fencing_token()),
        "the second campaign leads with a key that is gone"
    );
    ours_leads.resign().await.unwrap();
}

#[tokio::test]
async fn a_campaign_waits_for_the_delete_of_a_dropped_leadership_instead_of_joining_its_key() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let (proxy, cut_off) = common::behind_proxy(&cluster.endpoint(0)).await;
    let ours = Session::builder(cut_off)
        .ttl(secs(10))
        .release_timeout(millis(300))
        .build()
        .await
        .unwrap();
    let election = Election::new(&ours, unique("redo"));
    let old = within(secs(10), election.campaign("old")).await.unwrap();
    let old_token = old.fencing_token();
    let key = old.key().to_vec();
    // The release of the dropped leadership cannot reach etcd: it keeps timing out and
    // backing off while the next campaign starts.
    proxy.stall();
    drop(old);
    let again = spawn_campaign(&election, "the-new-campaign");
    // It waits for the release: its join does not go out meanwhile.
    let joined = tokio::time::timeout(millis(300), proxy.until_holding(b"the-new-campaign"));
    assert!(
        joined.await.is_err(),
        "joined while the release was in flight"
    );
    proxy.heal();
    let new = within(secs(10), again).await.unwrap().unwrap();
    assert_ne!(
        new.fencing_token(),
        old_token,
        "joined the key being deleted"
    );
    assert_eq!(
        create_revision(&client, &key).await,
        Some(new.fencing_token()),
        "leads with a key that is gone"
    );
    new.resign().await.unwrap();
}

/// A campaign of a session that reaches etcd through a proxy, queued behind another
/// session's leadership.
struct QueuedThroughAProxy {
    _cluster: EtcdCluster,
    /// Connected to the member directly.
    client: Client,
    proxy: Proxy,
    /// The other session's leadership.
    leading: Leadership,
    /// Of the session behind the proxy.
    election: Election,
    /// Its waiting campaign.
    first: JoinHandle<etcd_concurrency::Result<Leadership>>,
    our_key: Vec<u8>,
}

/// Starts a one-member cluster and returns once the campaign for `value` has queued.
async fn queued_through_a_proxy(name: &str, value: &str) -> QueuedThroughAProxy {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let (proxy, through_proxy) = common::behind_proxy(&cluster.endpoint(0)).await;
    let other = session(&client, 10).await;
    let leading = within(secs(10), Election::new(&other, name).campaign("other"))
        .await
        .unwrap();
    let ours = session(&through_proxy, 10).await;
    let election = Election::new(&ours, name);
    let first = spawn_campaign(&election, value);
    let our_key = hex_key(name, &ours);
    within(secs(5), appears(&client, &our_key)).await;
    QueuedThroughAProxy {
        _cluster: cluster,
        client,
        proxy,
        leading,
        election,
        first,
        our_key,
    }
}

#[tokio::test]
async fn a_key_left_to_a_campaign_that_is_then_refused_is_withdrawn() {
    let QueuedThroughAProxy {
        _cluster,
        client,
        proxy,
        leading,
        election,
        first,
        our_key,
    } = queued_through_a_proxy(&unique("left-to-refused"), "first").await;
    let withdrawn = Deletion::of(&client, &String::from_utf8(our_key.clone()).unwrap()).await;
    // The second campaign claims the key but cannot send its join yet; the first one,
    // cancelled meanwhile, leaves the key to it. Then etcd refuses the second's join.
    proxy.stall();
    let huge = vec![b'x'; 2 * 1024 * 1024];
    let second = spawn_campaign(&election, huge);
    within(secs(5), proxy.until_holding(&[b'x'; 4096])).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    proxy.heal();
    let refused = within(secs(10), second).await.unwrap();
    assert!(matches!(refused, Err(Error::Etcd(_))), "{refused:?}");
    within(secs(5), withdrawn.happened()).await;
    leading.resign().await.unwrap();
}

#[tokio::test]
async fn the_last_leadership_withdraws_a_key_left_by_a_campaign_cancelled_after_a_resign() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("after-resign");
    let (ours, other) = (session(&client, 10).await, session(&client, 10).await);
    let election = Election::new(&ours, &name);
    let first = within(secs(10), election.campaign("a")).await.unwrap();
    let second = within(secs(10), election.campaign("b")).await.unwrap(); // the same key
    let waiting = spawn_campaign(&Election::new(&other, &name), "other");
    within(secs(5), appears(&client, &hex_key(&name, &other))).await;
    first.resign().await.unwrap(); // ends both leaderships: the key is deleted
    let other_leads = within(secs(5), waiting).await.unwrap().unwrap();
    // A third campaign makes a new key, then is cancelled while the stale second
    // leadership still holds its claim.
    let third = spawn_campaign(&election, "c");
    let our_key = hex_key(&name, &ours);
    within(secs(5), holds(&client, &our_key, b"c")).await;
    let withdrawn = Deletion::of(&client, &String::from_utf8(our_key).unwrap()).await;
    third.abort();
    assert!(third.await.unwrap_err().is_cancelled());
    let resigned = within(secs(5), second.resign()).await;
    assert!(
        matches!(resigned, Err(Error::OwnershipLost)),
        "{resigned:?}"
    );
    within(secs(5), withdrawn.happened()).await;
    other_leads.resign().await.unwrap();
}

/// A leadership of `ours` in a fresh election, resigning half-way: its delete is applied
/// but its answer not taken yet, so it still holds its claim on the key. `other`, which
/// campaigned behind it, leads meanwhile.
struct ResignInFlight {
    election: Election,
    resign: Pin<Box<dyn Future<Output = etcd_concurrency::Result<()>> + Send>>,
    other_leads: Leadership,
}

async fn resign_in_flight(
    client: &Client,
    ours: &Session,
    other: &Session,
    name: &str,
) -> ResignInFlight {
    let election = Election::new(ours, name);
    let leading = within(secs(10), election.campaign("a")).await.unwrap();
    let waiting = spawn_campaign(&Election::new(other, name), "other");
    within(secs(5), appears(client, &hex_key(name, other))).await;
    let our_key = String::from_utf8(hex_key(name, ours)).unwrap();
    let resigned = Deletion::of(client, &our_key).await;
    let mut resign = Box::pin(leading.resign());
    assert!(futures::poll!(&mut resign).is_pending());
    within(secs(5), resigned.happened()).await;
    let other_leads = within(secs(5), waiting).await.unwrap().unwrap();
    ResignInFlight {
        election,
        resign,
        other_leads,
    }
}

#[tokio::test]
async fn a_resign_in_flight_withdraws_the_key_of_a_campaign_cancelled_meanwhile() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("resign-in-flight");
    let (ours, other) = (session(&client, 10).await, session(&client, 10).await);
    let ResignInFlight {
        election,
        resign,
        other_leads,
    } = resign_in_flight(&client, &ours, &other, &name).await;
    let our_key = hex_key(&name, &ours);
    // A campaign makes a new key behind the new leader and is cancelled meanwhile.
    let again = spawn_campaign(&election, "b");
    within(secs(5), holds(&client, &our_key, b"b")).await;
    let withdrawn = Deletion::of(&client, &String::from_utf8(our_key).unwrap()).await;
    again.abort();
    assert!(again.await.unwrap_err().is_cancelled());
    within(secs(5), resign).await.unwrap();
    within(secs(5), withdrawn.happened()).await;
    other_leads.resign().await.unwrap();
}

#[tokio::test]
async fn a_resign_in_flight_withdraws_the_key_made_by_the_join_of_a_campaign_cancelled_meanwhile() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("join-in-flight");
    let (proxy, through_proxy) = common::behind_proxy(&cluster.endpoint(0)).await;
    let (ours, other) = (
        session(&through_proxy, 10).await,
        session(&client, 10).await,
    );
    let ResignInFlight {
        election,
        resign,
        other_leads,
    } = resign_in_flight(&client, &ours, &other, &name).await;
    let our_key = String::from_utf8(hex_key(&name, &ours)).unwrap();
    // The campaign's join is held in the proxy when the campaign is cancelled; it makes a
    // new key once the proxy lets it through.
    let remade_and_withdrawn = Deletion::after_creation_of(&client, &our_key).await;
    cancel_a_campaign_whose_join_is_held(&proxy, &election, "cancelled-campaign").await;
    proxy.heal();
    within(secs(5), resign).await.unwrap();
    within(secs(5), remade_and_withdrawn.happened()).await;
    other_leads.resign().await.unwrap();
}

#[tokio::test]
async fn a_leadership_dropped_in_an_outage_while_a_cancelled_join_is_undone_is_released_after_it() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let (proxy, through_proxy) = common::behind_proxy(&cluster.endpoint(0)).await;
    let ours = Session::builder(through_proxy)
        .ttl(secs(20))
        .request_timeout(secs(1))
        .release_timeout(millis(300))
        .build()
        .await
        .unwrap();
    let election = Election::new(&ours, unique("outage"));
    let leading = within(secs(10), election.campaign("a")).await.unwrap();
    let key = String::from_utf8(leading.key().to_vec()).unwrap();
    let released = Deletion::of(&client, &key).await;
    // In the outage, a campaign's join hangs and the campaign is cancelled: its undo waits
    // for the join's outcome. The leadership is dropped meanwhile, so the undo is left to
    // release the leader's key, and must go on trying until etcd answers.
    cancel_a_campaign_whose_join_is_held(&proxy, &election, "cancelled-campaign").await;
    drop(leading);
    // The outage outlasts the join's request timeout and a few release attempts.
    tokio::time::sleep(millis(2_000)).await;
    proxy.heal();
    within(secs(5), released.happened()).await;
}

#[tokio::test]
async fn a_cancelled_campaign_withdraws_a_candidacy_left_by_an_earlier_process() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("leftover");
    let (other, earlier) = (session(&client, 10).await, session(&client, 10).await);
    let leading = within(secs(10), Election::new(&other, &name).campaign("other"))
        .await
        .unwrap();
    let waiting = spawn_campaign(&Election::new(&earlier, &name), "earlier");
    let key = hex_key(&name, &earlier);
    within(secs(5), appears(&client, &key)).await;
    // The earlier process hands its lease over and exits while its candidacy waits.
    waiting.abort();
    let lease = earlier.lease_id();
    earlier.orphan();
    let later = Session::builder(client.clone())
        .lease(lease)
        .build()
        .await
        .unwrap();
    assert!(exists(&client, key.as_slice()).await);
    let deletion = Deletion::of(&client, std::str::from_utf8(&key).unwrap()).await;
    let election = Election::new(&later, &name);
    let campaign = tokio::time::timeout(millis(300), election.campaign("later"));
    assert!(campaign.await.is_err(), "still waiting behind the leader");
    within(secs(5), deletion.happened()).await;
    leading.resign().await.unwrap();
}

#[tokio::test]
async fn a_campaign_whose_found_key_goes_with_its_lease_before_the_rewrite_says_session_lost() {
    let cluster = EtcdCluster::start(1).await;
    let member = cluster.endpoint(0);
    let client = cluster.client().await;
    let name = unique("rewrite-expired");
    let earlier = session(&client, 30).await;
    let leading = within(secs(10), Election::new(&earlier, &name).campaign("earlier"))
        .await
        .unwrap();
    // The earlier process hands its lease over and exits while it leads.
    let lease = earlier.lease_id();
    earlier.orphan();
    drop(leading); // its key stays: the session has ended
    let (proxy, slow) = common::behind_proxy(&member).await;
    let later = Session::builder(slow).lease(lease).build().await.unwrap();
    assert!(exists(&client, hex_key(&name, &later)).await);
    // The join finds the earlier key and its value; the rewrite reaches etcd a round trip
    // (2 s) after the join is applied, and the lease is revoked in between.
    proxy.delay(millis(1_000));
    let applied = proposals_applied(&member).await;
    let election = Election::new(&later, &name);
    let campaign = pin!(election.campaign("later"));
    let revoked = async {
        proposals_applied_exceed(&member, applied).await;
        client.clone().lease_revoke(lease).await.unwrap();
    };
    let (campaigned, ()) = within(secs(20), futures::future::join(campaign, revoked)).await;
    assert!(
        matches!(campaigned, Err(Error::SessionLost)),
        "{campaigned:?}"
    );
    assert!(later.is_lost(), "the session must know its lease is gone");
}

#[tokio::test]
async fn a_join_attempt_that_reaches_etcd_after_the_resign_leaves_no_key() {
    a_late_join_leaves_no_key(async |session, name| {
        let started = Instant::now();
        let election = Election::new(session, name);
        let leading = within(THROUGH_TWO_PATHS, election.campaign("a"))
            .await
            .unwrap();
        let took = started.elapsed();
        within(THROUGH_TWO_PATHS, leading.resign()).await.unwrap();
        took
    })
    .await;
}

#[tokio::test]
async fn a_proclaim_attempt_that_reaches_etcd_late_writes_nothing() {
    let cluster = EtcdCluster::start(1).await;
    let member = cluster.endpoint(0);
    let observer = cluster.client().await;
    let proxy = Proxy::start(&member).await.unwrap();
    let ours = two_path_session(&cluster, &proxy).await;
    let election = Election::new(&ours, unique("late-proclaim"));
    let leadership = within(secs(20), election.campaign("first")).await.unwrap();
    // Every byte through the proxy takes 2.3 s: an attempt that goes that way is sent
    // again after 2 s, answered the direct way, and reaches etcd 0.3 s or more later,
    // ahead of the reset that cancelled it (which follows it on its connection, as late);
    // etcd applies it (its put makes it a raft proposal).
    proxy.delay(millis(2_300));
    for round in 0..20 {
        let started = Instant::now();
        for value in [format!("earlier {round}"), format!("later {round}")] {
            within(THROUGH_TWO_PATHS, leadership.proclaim(value))
                .await
                .unwrap();
        }
        let held = started.elapsed() >= millis(1_900);
        let before = mod_revision(&observer, leadership.key()).await;
        let applied = proposals_applied(&member).await;
        if !held {
            continue;
        }
        let reached = proposals_applied_exceed(&member, applied);
        if tokio::time::timeout(secs(3), reached).await.is_err() {
            continue;
        }
        assert_eq!(
            mod_revision(&observer, leadership.key()).await,
            before,
            "a late attempt wrote the key"
        );
        let leader = within(secs(5), election.leader()).await.unwrap().unwrap();
        assert_eq!(leader.value(), format!("later {round}").as_bytes());
        return;
    }
    panic!("no proclaim attempt reached etcd late in 20 tries");
}

/// Compacts the history up to etcd's current revision, and waits until the compaction is
/// physically applied.
async fn compact_all(client: &mut Client) {
    let revision = client
        .get("any", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client
        .compact(revision, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
}

/// The mod revision of `key`, which exists.
async fn mod_revision(client: &Client, key: &[u8]) -> i64 {
    read(client, key, None).await.kvs()[0].mod_revision()
}

#[tokio::test]
async fn a_leader_whose_session_is_orphaned_proclaims_nothing() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let orphaned = session(&client, 30).await;
    let election = Election::new(&orphaned, unique("orphaned"));
    let leading = within(secs(10), election.campaign("before")).await.unwrap();
    // The lease and the key stay, but the session no longer keeps them: it is lost.
    orphaned.clone().orphan();
    assert!(orphaned.is_lost());
    let proclaimed = within(secs(5), leading.proclaim("after")).await;
    assert!(
        matches!(proclaimed, Err(Error::SessionLost)),
        "{proclaimed:?}"
    );
    let now = read(&client, leading.key(), None).await;
    assert_eq!(now.kvs()[0].value(), b"before", "nothing written");
}

/// `leader()` sorts the candidates by create revision, not by key: here the oldest
/// candidate's key (its lease id in hex) sorts after the newer one's, so a read of the
/// lowest key would name the newer candidate. Lease ids are chosen, as random ones order
/// the keys either way.
#[tokio::test]
async fn leader_is_the_oldest_candidate_even_when_its_key_sorts_last() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("leader-by-revision");
    let older = common::session_on_lease(&client, 0xb00).await;
    let newer = common::session_on_lease(&client, 0xa00).await;
    let leading = within(secs(10), Election::new(&older, &name).campaign("older"))
        .await
        .unwrap();
    let waiting = spawn_campaign(&Election::new(&newer, &name), "newer");
    within(secs(5), appears(&client, &hex_key(&name, &newer))).await;
    let leader = Election::new(&newer, &name).leader().await.unwrap();
    assert_eq!(leader.expect("someone leads").key(), leading.key());
    leading.resign().await.unwrap();
    within(secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .resign()
        .await
        .unwrap();
}

/// An observer that missed the resign of the leader it reported, compacted away, reads
/// the election again and reports the next leader: the candidates read replace those it
/// knew, so the one that resigned is forgotten instead of leading on in its view.
#[tokio::test]
async fn observe_forgets_a_leader_whose_resign_it_missed_behind_a_compaction() {
    let name = unique("observe-compacted-resign");
    let Observed {
        mut client,
        proxy,
        leading,
        mut observer,
        _cluster,
        _watcher,
    } = observed_through_a_proxy(&name, "first").await;
    let next = session(&client, 10).await;
    proxy.cut();
    let campaign = spawn_campaign(&Election::new(&next, &name), "next");
    within(secs(5), appears(&client, &hex_key(&name, &next))).await;
    leading.resign().await.unwrap();
    let leading_next = within(secs(5), campaign).await.unwrap().unwrap();
    compact_all(&mut client).await;
    proxy.heal();
    let leader = next_leader(&mut observer)
        .await
        .expect("the next candidate leads");
    assert_eq!(leader.key(), leading_next.key());
    leading_next.resign().await.unwrap();
}

/// A resign that finds the key re-created on its lease (as a campaign of the session since
/// cancelled, or an earlier process on the same lease, would make it) reports
/// OwnershipLost and withdraws that newer key in the background: nobody of the session is
/// left in the election to use it, and it would otherwise lead for the lease's life.
#[tokio::test]
async fn a_resign_that_finds_a_newer_key_of_its_lease_withdraws_it() {
    let cluster = EtcdCluster::start(1).await;
    let mut client = cluster.client().await;
    let name = unique("resign-finds-newer");
    let ours = session(&client, 10).await;
    let leading = within(secs(10), Election::new(&ours, &name).campaign("a"))
        .await
        .unwrap();
    let key = leading.key().to_vec();
    client.delete(key.clone(), None).await.unwrap();
    let lease = etcd_client::PutOptions::new().with_lease(ours.lease_id());
    client.put(key.clone(), "newer", Some(lease)).await.unwrap();
    let resigned = within(secs(5), leading.resign()).await;
    assert!(
        matches!(resigned, Err(Error::OwnershipLost)),
        "{resigned:?}"
    );
    within(secs(5), common::no_keys_under(&client, &name)).await;
}

/// A campaign cancelled while its join is in flight leaves the key to the campaign of the
/// session that shares it: once the join is answered, the undo finds the claim still
/// held and deletes nothing, and the other campaign goes on to lead.
#[tokio::test]
async fn a_campaign_cancelled_while_its_join_is_in_flight_leaves_the_shared_key() {
    let QueuedThroughAProxy {
        _cluster,
        client: _,
        proxy,
        leading,
        election,
        first,
        our_key,
    } = queued_through_a_proxy(&unique("cancelled-in-flight-shared"), "ours-shared").await;
    // The second campaign's join is held in the proxy when it is cancelled; it is
    // answered (finding the shared key) once the proxy heals.
    cancel_a_campaign_whose_join_is_held(&proxy, &election, "ours-shared").await;
    proxy.heal();
    leading.resign().await.unwrap();
    let ours_leads = within(secs(10), first).await.unwrap().unwrap();
    assert_eq!(ours_leads.key(), our_key.as_slice());
    ours_leads.resign().await.unwrap();
}

// One task thread: the rewrite's answer is held in the proxy when the link stalls.
#[tokio::test]
async fn a_campaign_whose_rewrite_goes_unanswered_gets_session_lost_once_lost() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("rewrite-stalled");
    let (proxy, slow) = common::behind_proxy(&cluster.endpoint(0)).await;
    // Requests retried for as long as it takes: only the session's loss can end the wait.
    let candidate = common::session_with(slow, secs(6), Duration::MAX).await;
    let election = Election::new(&candidate, &name);
    let leading = within(secs(10), election.campaign("a")).await.unwrap();
    proxy.delay(millis(1_000));
    // A second campaign of the session finds its key and rewrites its value.
    let campaign = spawn_campaign(&election, "b");
    // The rewrite is applied; its answer is on its way back when the link stalls.
    within(secs(10), holds(&client, &hex_key(&name, &candidate), b"b")).await;
    proxy.stall();
    within(secs(20), candidate.lost()).await;
    let result = within(secs(5), campaign).await.unwrap();
    assert!(matches!(result, Err(Error::SessionLost)), "{result:?}");
    proxy.heal();
    drop(leading);
}

#[tokio::test]
async fn a_resign_cut_off_goes_on_in_the_background_and_ends_the_sessions_other_leaderships() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("resign-sibling");
    let (proxy, slow) = common::behind_proxy(&cluster.endpoint(0)).await;
    let leader = common::session_with(slow, secs(30), secs(1)).await;
    let (first, second, next) = two_leaderships_and_a_candidate(&client, &leader, &name).await;
    proxy.cut();
    let resigned = within(secs(10), first.resign()).await;
    assert!(
        resigned.as_ref().is_err_and(Error::is_transient),
        "{resigned:?}"
    );
    proxy.heal();
    // As the resign would have, its delete ends the other leadership sharing the key.
    next.wins_ending(second, secs(15)).await;
}

// One task thread: the proclaim's answer is held in the proxy when the link stalls.
#[tokio::test]
async fn a_proclaim_that_goes_unanswered_gets_session_lost_once_lost() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("proclaim-stalled");
    let (proxy, slow) = common::behind_proxy(&cluster.endpoint(0)).await;
    // Requests retried for as long as it takes: only the session's loss can end the wait.
    let leader = common::session_with(slow, secs(6), Duration::MAX).await;
    let leadership = within(secs(10), Election::new(&leader, &name).campaign("a"))
        .await
        .unwrap();
    proxy.delay(millis(1_000));
    let proclaiming = tokio::spawn(async move { leadership.proclaim("b").await });
    // The put is applied; its answer is on its way back when the link stalls.
    within(secs(10), holds(&client, &hex_key(&name, &leader), b"b")).await;
    proxy.stall();
    within(secs(20), leader.lost()).await;
    let result = within(secs(5), proclaiming).await.unwrap();
    assert!(matches!(result, Err(Error::SessionLost)), "{result:?}");
    proxy.heal();
}

/// A resign whose future is dropped before its first poll (a `select!` whose other branch
/// was ready first, say) has still been asked for: as the docs of `resign` say of a resign
/// dropped before its delete is known to be applied, resigning goes on in the background,
/// ending the session's other leadership sharing the key, and the next candidate leads.
#[tokio::test]
async fn a_resign_dropped_before_its_first_poll_still_resigns() {
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let name = unique("resign-unpolled");
    let leader = session(&client, 30).await;
    let (first, second, next) = two_leaderships_and_a_candidate(&client, &leader, &name).await;
    drop(first.resign());
    next.wins_ending(second, secs(5)).await;
}
