//! The IPC server: local processes speak line-JSON over the local socket
//! ([`qio_platform::local`]: a Unix socket, through interprocess's types).

/// What to do with a client whose outbound buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowClientPolicy {
    /// Drop the client's oldest events and tell it how many were lost (the default).
    DropOldest,
    /// Disconnect the client.
    Disconnect,
}

/// Bounds and policies of the local side.
#[derive(Debug, Clone)]
pub struct IpcConfig {
    /// Longest request line accepted, in bytes.
    pub max_line_bytes: usize,
    /// Events buffered for one client before the slow-client policy applies.
    pub client_queue_events: usize,
    /// Bytes of lines buffered for one client (events and replies); with
    /// `client_queue_events`, whichever is reached first applies.
    pub client_queue_bytes: usize,
    /// How long a client whose session ends (slow-client policy, overflow, shutdown,
    /// half-close) may take to read what was queued for it before its socket is closed
    /// anyway: a client that stopped reading must not keep its descriptor and task.
    pub client_close_grace: Duration,
    /// What happens to a client that does not read fast enough.
    pub slow_client: SlowClientPolicy,
    /// How long the fan-out waits, when every client getting events has fallen behind
    /// (half its queue is full), for one of them to catch up before `slow_client` applies;
    /// the server is not read meanwhile, so `run` keeps it to at most half the session's
    /// ping timeout.
    pub catch_up_wait: Duration,
    /// Most local clients connected at once.
    pub max_clients: usize,
    /// Most requests one client may have waiting for an answer.
    pub max_pending_per_client: usize,
    /// Most paths one client may subscribe to.
    pub max_subscriptions_per_client: usize,
    /// Most bytes of request ids kept for one client's requests waiting for an answer
    /// (an id may be as long as a line).
    pub max_pending_id_bytes_per_client: usize,
    /// Most server callback requests handed to local clients that are remembered (the
    /// oldest are forgotten first, and can then no longer be answered).
    pub max_handles: usize,
    /// Groups whose members may connect besides the daemon's own user.
    pub allowed_gids: Vec<u32>,
    /// One log line per refused uid per this interval, with the count of the others.
    pub refusal_log_interval: Duration,
    /// How often the binary checks that its socket file is still the one it bound.
    pub socket_check_interval: Duration,
}

impl Default for IpcConfig {
    fn default() -> Self {
        IpcConfig {
            max_line_bytes: 1024 * 1024,
            client_queue_events: 4096,
            client_queue_bytes: 4 * 1024 * 1024,
            client_close_grace: Duration::from_secs(2),
            slow_client: SlowClientPolicy::DropOldest,
            catch_up_wait: Duration::from_millis(100),
            max_clients: 16_384,
            max_pending_per_client: 1024,
            max_subscriptions_per_client: 4096,
            max_pending_id_bytes_per_client: 16 * 1024 * 1024,
            max_handles: 65_536,
            allowed_gids: Vec::new(),
            refusal_log_interval: Duration::from_secs(60),
            socket_check_interval: Duration::from_secs(2),
        }
    }
}

/// A bound of [`IpcConfig`] is zero: nothing could ever fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} must be at least 1")]
pub struct ZeroBound(pub &'static str);

impl IpcConfig {
    /// Checks what a library embedder may get wrong: a zero bound, which would refuse
    /// everything (or worse, later).
    pub fn validate(&self) -> Result<(), ZeroBound> {
        let bounds = [
            ("max_line_bytes", self.max_line_bytes),
            ("client_queue_events", self.client_queue_events),
            ("max_clients", self.max_clients),
            ("max_pending_per_client", self.max_pending_per_client),
            (
                "max_subscriptions_per_client",
                self.max_subscriptions_per_client,
            ),
            (
                "max_pending_id_bytes_per_client",
                self.max_pending_id_bytes_per_client,
            ),
            ("max_handles", self.max_handles),
        ];
        match bounds.into_iter().find(|(_, v)| *v == 0) {
            Some((key, _)) => Err(ZeroBound(key)),
            None => Ok(()),
        }
    }
}

mod client;
mod hub;
mod lines;
mod outbox;
mod peer;

pub use hub::{run_notices, Hub};

use crate::driver::SessionHandle;
use qio_platform::local::{self, Listener};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Accepts local clients until `stop_accepting`; each client runs until it leaves or
/// `stop_clients`. Returns once every client task has ended.
///
/// Every task it starts runs in `tasks` (the daemon's tracker), so they are waited for
/// even if this loop itself fails; `clients` only counts the client tasks for
/// `max_clients`.
pub async fn serve(
    listener: Listener,
    cfg: IpcConfig,
    session: SessionHandle,
    hub: Arc<Hub>,
    stop_accepting: CancellationToken,
    stop_clients: CancellationToken,
    tasks: TaskTracker,
) {
    let cfg = Arc::new(cfg);
    let clients = TaskTracker::new();
    let own_uid = qio_platform::users::own_euid();
    let mut next_id = 0u64;
    let gate = peer::Gate::new(own_uid, cfg.allowed_gids.clone(), cfg.refusal_log_interval);
    let mut flush = tokio::time::interval(gate.flush_interval().max(Duration::from_millis(1)));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            _ = stop_accepting.cancelled() => break,
            _ = flush.tick() => {
                gate.flush();
                continue;
            }
            accepted = local::accept(&listener) => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                // Usually EMFILE: wait a little rather than spin, the clients will leave.
                tracing::warn!("accepting a local client failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ask = match gate.check(&stream) {
            peer::Door::Open => None,
            peer::Door::Shut => continue,
            peer::Door::Ask { uid, gid, pid } => Some((uid, gid, pid)),
        };
        if clients.len() >= cfg.max_clients {
            tracing::warn!(
                max_clients = cfg.max_clients,
                "refused a local client: too many clients"
            );
            if ask.is_some() {
                // Not known to be allowed yet: it gets no line at all.
                continue;
            }
            let mut stream = stream;
            tasks.spawn(async move {
                use tokio::io::AsyncWriteExt;
                let line = b"{\"event\":\"/error\",\"data\":{\"code\":-3,\"err_msg\":\"too many local clients (max_clients); try again later\"}}\n";
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(line)).await;
            });
            continue;
        }
        next_id += 1;
        let serve = client::serve_client(
            stream,
            next_id,
            hub.clone(),
            session.clone(),
            cfg.clone(),
            stop_clients.clone(),
        );
        match ask {
            None => tasks.spawn(clients.track_future(serve)),
            // The group database may block (NSS over the network): never on this loop.
            Some((uid, gid, pid)) => {
                let gate = gate.clone();
                tasks.spawn(clients.track_future(async move {
                    if gate.ask_database(uid, gid, pid).await {
                        serve.await;
                    }
                }))
            }
        };
    }
    clients.close();
    clients.wait().await;
}
