//! [`Holder`]: who holds a lock, as [`Mutex::holder`](crate::Mutex::holder) reads it.

use std::fmt;

use etcd_client::KeyValue;

use crate::session::lease_hex;

/// The holder of a lock as [`Mutex::holder`](crate::Mutex::holder) read it: the key with
/// the lowest create revision under the lock's name, which is the lock's holder for every
/// client that locks it as Go's `concurrency.Mutex` does (this crate, `etcdctl lock`,
/// etcd's Lock service). Go has no such lookup; its accessors mirror the fields of the
/// key's `mvccpb.KeyValue` (`Key`, `CreateRevision`, `Lease`).
///
/// ```no_run
/// # async fn example(mutex: etcd_concurrency::Mutex) -> etcd_concurrency::Result<()> {
/// if let Some(holder) = mutex.holder().await? {
///     println!(
///         "held on lease {} since revision {}",
///         holder.lease_id(),
///         holder.create_revision()
///     );
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Holder {
    key: Vec<u8>,
    create_revision: i64,
    lease_id: i64,
}

impl Holder {
    pub(crate) fn from_kv(kv: &KeyValue) -> Holder {
        Holder {
            key: kv.key().to_vec(),
            create_revision: kv.create_revision(),
            lease_id: kv.lease(),
        }
    }

    /// The holder's key: the lock's name, `/`, and its lease id in lowercase hex (for a
    /// key written by hand, whatever follows the `/`).
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The create revision of the holder's key: its fencing token, as its
    /// [`MutexGuard::fencing_token`](crate::MutexGuard::fencing_token) gives it.
    pub fn create_revision(&self) -> i64 {
        self.create_revision
    }

    /// The id of the lease the holder's key is attached to: that of the holder's session
    /// ([`Session::lease_id`](crate::Session::lease_id)); 0 for a key without a lease,
    /// which holds the lock until someone deletes it.
    pub fn lease_id(&self) -> i64 {
        self.lease_id
    }
}

impl fmt::Debug for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Holder")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("create_revision", &self.create_revision)
            .field("lease_id", &format_args!("{}", lease_hex(self.lease_id)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::Holder;

    #[test]
    fn a_holder_debugs_its_key_as_text_and_its_lease_in_hex() {
        let holder = Holder {
            key: b"/locks/reports/694d7f3a".to_vec(),
            create_revision: 42,
            lease_id: 0x694d7f3a,
        };
        assert_eq!(
            format!("{holder:?}"),
            r#"Holder { key: "/locks/reports/694d7f3a", create_revision: 42, lease_id: 694d7f3a }"#
        );
    }
}
