//! The crate's error type.

use std::time::Duration;

/// Everything that can go wrong in this crate.
///
/// The enum is `#[non_exhaustive]`: match the variants you handle and keep a catch-all arm.
///
/// ```no_run
/// use etcd_concurrency::{Error, Mutex};
/// # async fn example(mutex: Mutex) {
/// match mutex.lock().await {
///     Ok(guard) => drop(guard),
///     Err(Error::SessionLost) => println!("the session's lease is gone: make a new session"),
///     Err(error) if error.is_transient() => println!("etcd unreachable, try again: {error}"),
///     // etcd's own words are part of the text, e.g. "etcd request failed: grpc request
///     // error: code: 'Client specified an invalid argument', message: \"etcdserver:
///     // request is too large\"" (over 2 MiB, etcd's gRPC server refuses the message
///     // instead: "... message: \"grpc: received message larger than max ...\"").
///     Err(error) => println!("{error}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// etcd answered a request with an error, or the request could not be delivered (a
    /// refused connection is this, not [`Error::Timeout`]).
    ///
    /// The text ends with etcd-client's, which holds etcd's message (for instance
    /// "etcdserver: request is too large"); match the variant to inspect the
    /// [`etcd_client::Error`] itself, which has no source of its own, so this variant gives
    /// none either. [`Error::is_transient`] tells whether a retry may succeed (member
    /// unavailable, connection refused or lost, leader changed). Go's functions return the
    /// gRPC or `rpctypes` error as it is.
    #[error("etcd request failed: {0}")]
    Etcd(etcd_client::Error),

    /// The session's lease is gone: it expired, was revoked (by [`Session::close`] or by
    /// someone else), or no keep-alive succeeded for a whole TTL. Keys attached to it are
    /// (or will shortly be) deleted, so no lock or leadership built on it can be assumed.
    /// Unless it was closed, the session logs which of these it was as a `tracing`
    /// warning when it notices (`lease lost: etcd says it is gone (expired or revoked)`,
    /// for instance). Go's `ErrSessionExpired`.
    ///
    /// Also returned by a session on which [`Session::orphan`] was called (through any of
    /// its handles), or whose runtime has shut down, although its lease may still exist
    /// (after `orphan`, an unlock or resign still sends the delete of its key); and by
    /// [`SessionBuilder::build`] when a grant sent again found that its earlier attempt,
    /// whose answer was lost, had granted the lease and that it expired since, or when the
    /// grant's answer came a whole TTL after it was sent.
    ///
    /// [`Session::close`]: crate::Session::close
    /// [`Session::orphan`]: crate::Session::orphan
    /// [`SessionBuilder::build`]: crate::SessionBuilder::build
    #[error(
        "session lost: its lease expired, was revoked or could not be kept alive, the \
         session was closed or orphaned, or the Tokio runtime it was built on shut down; \
         build a new session (on a runtime that outlives it)"
    )]
    SessionLost,

    /// A lock's or an election's key is no longer the one this handle created: it was
    /// deleted (by someone else, or when the lease ended) or re-created by a newer holder.
    /// An unlock that returns it changed nothing; a resign deleted nothing of its own, but
    /// may withdraw in the background a newer key of the session left by a cancelled
    /// campaign (see [`Leadership::resign`]); for a proclaim, see
    /// [`Leadership::proclaim`]. Go's `Proclaim` returns `ErrElectionNotLeader` in this
    /// case; Go's `Resign` and `Unlock` report nothing.
    ///
    /// Also returned by [`Mutex::lock`] and [`Election::campaign`] when the key they wait
    /// with (or, for a campaign, the session's key it found and is writing its value to)
    /// is deleted while its lease lives, or vanishes while the lease cannot be checked (a
    /// key gone with its lease is [`Error::SessionLost`]). Go's `Lock` returns
    /// `ErrSessionExpired` for a waiting key that is gone, whatever removed it.
    ///
    /// [`Leadership::proclaim`]: crate::Leadership::proclaim
    /// [`Leadership::resign`]: crate::Leadership::resign
    /// [`Mutex::lock`]: crate::Mutex::lock
    /// [`Election::campaign`]: crate::Election::campaign
    #[error("ownership lost: the key was deleted or now belongs to a newer holder")]
    OwnershipLost,

    /// An argument was rejected: before anything was sent to etcd (empty name, TTL out of
    /// range, zero timeout, ...), after a look-up (a lease to resume that etcd does not
    /// know), or, from [`Stm::run`], after the closure ran, when it wrote to an empty key or
    /// read one and returned `Ok` anyway (nothing is committed). The text says which and
    /// why. No Go counterpart: Go sends the request, and etcd refuses it.
    ///
    /// [`Stm::run`]: crate::Stm::run
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// An STM transaction's runs all conflicted, `attempts` of them: its reads were no
    /// longer current at commit, or it went on after a read that failed (see
    /// [`StmTxn::get`]); nothing was written. No Go counterpart: Go's STM runs the
    /// transaction again until it commits or its context ends.
    ///
    /// [`StmTxn::get`]: crate::StmTxn::get
    #[error("transaction gave up after {attempts} conflicting attempts")]
    TooManyConflicts {
        /// How many attempts conflicted (runs made again after a compaction not counted).
        attempts: u32,
    },

    /// etcd gave no answer within the time allowed (`after`): the requests sent were
    /// neither answered nor failed, as when a network link drops packets or a member hangs.
    /// Requests that kept failing (an endpoint that refuses connections) give their last
    /// error, [`Error::Etcd`], instead. To tell an outage of either kind, use
    /// [`Error::is_transient`]. Where Go's caller would see its `context`'s
    /// `DeadlineExceeded`.
    #[error("no answer from etcd to a {call} request within {after:?}")]
    Timeout {
        /// The request that went unanswered, by its name in etcd's gRPC API: `"Txn"`,
        /// `"Range"`, `"Watch"` (opening a watch, or a read its follower made), `"LeaseGrant"`,
        /// `"LeaseKeepAlive"`, `"LeaseTimeToLive"`, `"LeaseRevoke"` or `"Authenticate"`.
        call: &'static str,
        /// How long the request was given.
        after: Duration,
    },
}

/// `Result` with this crate's [`Error`] as the default error type (Go returns `error`).
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<etcd_client::Error> for Error {
    fn from(error: etcd_client::Error) -> Self {
        Error::Etcd(error)
    }
}

impl Error {
    /// Whether retrying the same request may succeed: the member was unavailable or
    /// overloaded ("too many requests"), the connection broke or the call was cut off
    /// (gRPC `Unavailable`, `Cancelled`, `Aborted`, `Unknown` as for raft's "proposal
    /// dropped", transport and I/O errors), the leader changed, a watch or keep-alive
    /// stream failed, the auth store changed while etcd served the request ("revision of
    /// auth store is old"), or no answer came in time ([`Error::Timeout`], gRPC
    /// `DeadlineExceeded`). A transient error from a write may leave its outcome unknown.
    /// No Go counterpart: Go's callers inspect the gRPC status code (`codes.Unavailable`,
    /// `codes.DeadlineExceeded`) themselves.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Etcd(error) => is_transient(error),
            Error::Timeout { .. } => true,
            _ => false,
        }
    }
}

/// Whether an etcd-client error may go away on retry.
pub(crate) fn is_transient(error: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    use tonic::Code;
    match error {
        // `Cancelled` is what tonic reports when the connection closes under a request
        // (its member died); this crate never cancels a call through gRPC itself.
        E::GRpcStatus(status) => {
            matches!(
                status.code(),
                Code::Unavailable
                    | Code::Unknown
                    | Code::Aborted
                    | Code::DeadlineExceeded
                    | Code::Cancelled
            ) || etcd_says(error, Code::ResourceExhausted, TOO_MANY_REQUESTS)
                || is_auth_old_revision(error)
                || is_broken_connection(status)
        }
        E::LeaseKeepAliveError(_) => !is_lease_gone(error),
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) => true,
        _ => false,
    }
}

/// Whether etcd refused a request because the auth store changed (a user, role or
/// permission, anywhere in the cluster) between its authentication and its apply
/// (`ErrGRPCAuthOldRevision`). Nothing was applied, and the same request, authenticated
/// again, is served: Go's client retries it after renewing its token, etcd-client does
/// not. etcd's simple tokens carry no revision: sent again as it is, the request is
/// served. A JWT carries the revision it was issued at: every request made with it is
/// refused until the client authenticates again (see `retry::OldToken`).
pub(crate) fn is_auth_old_revision(error: &etcd_client::Error) -> bool {
    etcd_says(error, tonic::Code::InvalidArgument, AUTH_OLD_REVISION)
}

/// etcd's `ErrGRPCAuthOldRevision`.
const AUTH_OLD_REVISION: &str = "revision of auth store is old";

/// Whether tonic reports that the HTTP/2 connection failed under a request: the member
/// sent GOAWAY as it shut down, or reset the stream (`ENHANCE_YOUR_CALM` under load),
/// which tonic reports as `Internal` or `ResourceExhausted`. grpc-go reports the same
/// failures as `Unavailable`, and Go's callers retry them.
fn is_broken_connection(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Internal | tonic::Code::ResourceExhausted
    ) && status.message().starts_with(H2_ERROR)
}

/// How tonic's message for a failure of the HTTP/2 connection begins.
const H2_ERROR: &str = "h2 protocol error";

/// etcd's default `--max-txn-ops`: the most compares, or operations per branch, one Txn may
/// hold.
pub(crate) const ETCD_MAX_TXN_OPS: usize = 128;

/// etcd's back-pressure, sent before anything is proposed.
const TOO_MANY_REQUESTS: &str = "too many requests";
/// raft's `ErrProposalDropped`, which etcd passes on as it is.
const PROPOSAL_DROPPED: &str = "raft proposal dropped";

/// Whether `error` is etcd's gRPC status `code` with a message containing `text` (etcd's
/// errors are told apart by their message; see its `rpctypes`).
fn etcd_says(error: &etcd_client::Error, code: tonic::Code, text: &str) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.code() == code && status.message().contains(text))
}

/// Whether etcd rejected a read pinned to a revision the serving member has not applied yet
/// ("mvcc: required revision is a future revision", etcd #11963).
pub(crate) fn is_future_revision(error: &etcd_client::Error) -> bool {
    etcd_says(error, tonic::Code::OutOfRange, "future revision")
}

/// Whether a pinned read asked for a revision that compaction removed.
pub(crate) fn is_compacted(error: &etcd_client::Error) -> bool {
    etcd_says(error, tonic::Code::OutOfRange, "compacted")
}

/// Whether an answer was over the client's size limit (tonic's 4 MiB by default).
pub(crate) fn is_answer_too_large(error: &etcd_client::Error) -> bool {
    etcd_says(
        error,
        tonic::Code::OutOfRange,
        "decoded message length too large",
    )
}

/// Whether etcd's gRPC server refused a request over its size limit (2 MiB by default:
/// `--max-request-bytes` plus a margin) before reading it.
pub(crate) fn is_request_too_large(error: &etcd_client::Error) -> bool {
    etcd_says(
        error,
        tonic::Code::ResourceExhausted,
        "grpc: received message larger than max",
    )
}

/// Whether etcd refused to grant a lease because its id is taken.
pub(crate) fn is_lease_taken(error: &etcd_client::Error) -> bool {
    etcd_says(
        error,
        tonic::Code::FailedPrecondition,
        "lease already exists",
    )
}

/// Whether etcd refused a write for its backend quota ("mvcc: database space exceeded",
/// `ErrGRPCNoSpace`). Not transient: writes that add data fail until an operator frees space
/// and disarms the NOSPACE alarm. Yet a Put, Txn or LeaseGrant that got it may have been
/// applied: the gRPC layer refuses a write only if the quota is already used up when it
/// arrives, but one that passed there and crosses the quota at its apply is applied, then
/// answered with this error (etcd 3.4 `etcdserver/apply.go`, `quotaApplierV3`), as is every
/// write applied before the alarm it raises is.
pub(crate) fn is_no_space(error: &etcd_client::Error) -> bool {
    etcd_says(
        error,
        tonic::Code::ResourceExhausted,
        "database space exceeded",
    )
}

/// Whether etcd no longer knows the lease a request named (expired or revoked): its answer
/// "requested lease not found" to a request, or etcd-client's "lease not found" for a
/// keep-alive (which etcd answers with TTL 0 rather than an error).
pub(crate) fn is_lease_gone(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::LeaseKeepAliveError(reason) => reason.contains("not found"),
        _ => etcd_says(error, tonic::Code::NotFound, "lease not found"),
    }
}

/// Whether a write that failed with `error` was certainly not applied: the connection was
/// refused, etcd turned it away before proposing it (no leader, too many requests), raft
/// dropped the proposal before appending it (no leader known, or leadership being
/// transferred: raft's `ErrProposalDropped`), or its apply refused it for an auth store
/// changed since it was authenticated.
pub(crate) fn was_not_applied(error: &etcd_client::Error) -> bool {
    use tonic::Code;
    let etcd_client::Error::GRpcStatus(status) = error else {
        return false;
    };
    let message = status.message();
    match status.code() {
        Code::Unavailable => message.contains("tcp connect error") || message.contains("no leader"),
        _ => {
            etcd_says(error, Code::ResourceExhausted, TOO_MANY_REQUESTS)
                || etcd_says(error, Code::Unknown, PROPOSAL_DROPPED)
                || is_auth_old_revision(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_lowercase_and_say_what_etcd_said() {
        let status = tonic::Status::unavailable("etcdserver: leader changed");
        let error = Error::from(etcd_client::Error::GRpcStatus(status));
        assert_eq!(
            error.to_string(),
            "etcd request failed: grpc request error: code: 'The service is currently \
             unavailable', message: \"etcdserver: leader changed\""
        );
        // The cause is in the text, so chain printers must not find it again.
        assert!(std::error::Error::source(&error).is_none());
        assert!(error.is_transient());
        for error in [
            Error::SessionLost,
            Error::OwnershipLost,
            Error::InvalidArgument("x".into()),
            Error::TooManyConflicts { attempts: 3 },
            Error::Timeout {
                call: "Txn",
                after: Duration::from_secs(1),
            },
        ] {
            let text = error.to_string();
            assert!(text.starts_with(|c: char| c.is_lowercase()), "{text}");
        }
    }

    #[test]
    fn only_delivery_failures_are_transient() {
        let denied = tonic::Status::permission_denied("etcdserver: permission denied");
        assert!(!Error::from(etcd_client::Error::GRpcStatus(denied)).is_transient());
        assert!(!Error::SessionLost.is_transient());
        let gone = etcd_client::Error::LeaseKeepAliveError("lease not found".into());
        assert!(is_lease_gone(&gone));
        assert!(!Error::from(gone).is_transient());
        let future = tonic::Status::out_of_range("mvcc: required revision is a future revision");
        assert!(is_future_revision(&etcd_client::Error::GRpcStatus(future)));
        let refused = tonic::Status::unavailable("tcp connect error");
        assert!(was_not_applied(&etcd_client::Error::GRpcStatus(refused)));
        let timed_out = tonic::Status::unavailable("etcdserver: request timed out");
        assert!(!was_not_applied(&etcd_client::Error::GRpcStatus(timed_out)));
        let busy = tonic::Status::resource_exhausted("etcdserver: too many requests");
        assert!(Error::from(etcd_client::Error::GRpcStatus(busy)).is_transient());
        let compacted = tonic::Status::out_of_range("mvcc: required revision has been compacted");
        assert!(is_compacted(&etcd_client::Error::GRpcStatus(compacted)));
        let gone = tonic::Status::not_found("etcdserver: requested lease not found");
        assert!(is_lease_gone(&etcd_client::Error::GRpcStatus(gone)));
        let old = tonic::Status::invalid_argument("etcdserver: revision of auth store is old");
        let old = etcd_client::Error::GRpcStatus(old);
        assert!(is_transient(&old) && was_not_applied(&old));
        let dropped = tonic::Status::unknown("raft proposal dropped");
        let dropped = etcd_client::Error::GRpcStatus(dropped);
        assert!(is_transient(&dropped) && was_not_applied(&dropped));
        let taken = tonic::Status::failed_precondition("etcdserver: lease already exists");
        assert!(is_lease_taken(&etcd_client::Error::GRpcStatus(taken)));
        let full = tonic::Status::resource_exhausted("etcdserver: mvcc: database space exceeded");
        let full = etcd_client::Error::GRpcStatus(full);
        assert!(is_no_space(&full) && !is_transient(&full) && !was_not_applied(&full));
    }

    #[test]
    fn a_broken_http2_connection_is_transient_and_etcds_own_internal_errors_are_not() {
        let status = |code, message: &str| {
            Error::from(etcd_client::Error::GRpcStatus(tonic::Status::new(
                code, message,
            )))
        };
        let calm = "h2 protocol error: stream error received: detected excessive load \
                    generating behavior";
        assert!(status(tonic::Code::ResourceExhausted, calm).is_transient());
        let away = "h2 protocol error: connection error received: not a result of an error";
        assert!(status(tonic::Code::Internal, away).is_transient());
        assert!(!status(tonic::Code::Internal, "etcdserver: corrupt cluster").is_transient());
        let limit = "grpc: received message larger than max";
        assert!(!status(tonic::Code::ResourceExhausted, limit).is_transient());
    }
}
