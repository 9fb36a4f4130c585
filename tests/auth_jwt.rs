//! etcd's JWT auth tokens (`--auth-token=jwt`): each carries the auth store revision it
//! was issued at, so after any change of users, roles or permissions every request made
//! with it is refused ("revision of auth store is old") until the client authenticates
//! again, which etcd-client does not do for that error. The crate renews the token when a
//! request keeps being refused so. The only test of its binary: it sets the environment
//! variable that gives etcd the option.

mod common;

use common::{secs, unique, within};
use etcd_client::{Client, ConnectOptions};
use etcd_concurrency::testing::EtcdCluster;
use etcd_concurrency::{Error, Mutex, Session, Stm};

/// A one-member cluster handing out JWTs signed with HS256, with auth on, and a client of
/// its root user that renews the token when etcd calls it invalid.
async fn jwt_cluster(key_dir: &std::path::Path) -> (EtcdCluster, Client) {
    let key = key_dir.join("jwt.key");
    std::fs::write(&key, rand::random::<[u8; 32]>()).unwrap();
    let option = format!("jwt,priv-key={},sign-method=HS256", key.display());
    // SAFETY: the only test of this binary sets it before any thread could read the
    // environment, other than the etcd processes it starts.
    unsafe { std::env::set_var("ETCD_AUTH_TOKEN", option) };
    let cluster = EtcdCluster::start(1).await;
    let mut admin = cluster.client().await;
    admin.user_add("root", "root-secret", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    let options = ConnectOptions::new()
        .with_user("root", "root-secret")
        .with_auto_token_refresh(true);
    let root = Client::connect(cluster.endpoints(), Some(options))
        .await
        .unwrap();
    (cluster, root)
}

/// After a change of the auth store, an unlock, a lock and an STM run through a client
/// whose JWT predates it all succeed. Before, each was refused until its deadline; the
/// unlock went on in the background with the old token for the session's life, and held
/// the lock all that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_a_jwt_older_than_the_auth_store_renew_it() {
    let key_dir = tempfile::tempdir().unwrap();
    let (_cluster, root) = jwt_cluster(key_dir.path()).await;
    let session = Session::builder(root.clone())
        .request_timeout(secs(5))
        .build()
        .await
        .unwrap();
    let name = unique("jwt");
    let guard = within(secs(10), Mutex::new(&session, &name).lock())
        .await
        .unwrap();
    let key = guard.key().to_vec();
    let change = || async {
        let user = unique("someone").replace('/', "-");
        root.clone().user_add(user, "secret", None).await.unwrap();
    };

    change().await;
    within(secs(10), guard.unlock()).await.unwrap();
    assert_eq!(root.clone().get(key, None).await.unwrap().count(), 0);

    change().await;
    let again = within(secs(10), Mutex::new(&session, &name).lock()).await;
    within(secs(10), again.unwrap().unlock()).await.unwrap();

    change().await;
    let counter = format!("{name}-counter");
    let stm = Stm::new(root.clone());
    let counted = stm.run(async |tx| {
        tx.put(counter.as_str(), "1");
        Ok::<_, Error>(())
    });
    within(secs(10), counted).await.unwrap();
    within(secs(10), session.close()).await.unwrap();
}
