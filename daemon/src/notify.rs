//! Telling systemd how the daemon is doing, over `sd_notify(3)`: readiness, a status line
//! about the upstream connection, watchdog keep-alives, reloads and stopping.
//!
//! The protocol itself is the `sd-notify` crate's. Everything here is a no-op when
//! `NOTIFY_SOCKET` is unset (not started by systemd, or not `Type=notify`): the binary then
//! does not even observe the daemon, so a plain run pays nothing.

use qiod::driver::SessionHandle;
use qiod::session::StateChange;
use sd_notify::NotifyState;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use url::Url;

/// Whether a service manager listens for notifications.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|v| !v.is_empty())
}

/// How often systemd wants a keep-alive (`WatchdogSec=`), if at all.
///
/// `sd-notify` applies systemd's rule: `WATCHDOG_USEC` counts only when `WATCHDOG_PID` is
/// unset or is our pid, so a child that inherited the variables does not answer for us.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Sends `states` if anyone listens. A failure is only logged: systemd reports a missing
/// READY=1 or keep-alive by itself, and the daemon is still worth running without it.
fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("cannot notify the service manager: {e}");
    }
}

/// A configuration reload (SIGHUP) started; systemd shows the unit as reloading until
/// [`reloaded`]. The timestamp lets it tell this reload from an older one.
pub fn reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The reload is over, applied or not (a bad file keeps the running configuration).
pub fn reloaded() {
    send(&[NotifyState::Ready]);
}

/// The daemon is about to exit because of `error`: shown by `systemctl status`, where the
/// exit code alone would say little.
pub fn failed(error: &anyhow::Error) {
    send(&[NotifyState::Status(&format!("failed: {error:#}"))]);
}

/// Tells systemd about the daemon until `shutdown`: READY=1 once `ready` delivers the
/// session (the socket is then accepting), a STATUS= line per upstream state change,
/// WATCHDOG=1 every half `watchdog` period while the session loop answers, and STOPPING=1
/// as soon as the shutdown starts.
pub async fn supervise(
    ready: oneshot::Receiver<SessionHandle>,
    mut states: mpsc::Receiver<StateChange>,
    watchdog: Option<Duration>,
    shutdown: CancellationToken,
) {
    let session = tokio::select! {
        _ = shutdown.cancelled() => {
            send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
            return;
        }
        session = ready => match session {
            Ok(session) => session,
            // The daemon failed to start; main reports why.
            Err(_) => return,
        },
    };
    // Changes from before readiness (the first connection attempt) make the first status.
    let mut status = Status::default();
    let mut text = "starting".to_owned();
    while let Ok(change) = states.try_recv() {
        if let Some(t) = status.update(&change) {
            text = t;
        }
    }
    send(&[NotifyState::Ready, NotifyState::Status(&text)]);
    tracing::debug!("told the service manager we are ready");

    let mut keepalive = watchdog.map(Keepalive::new);
    let mut states_open = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            change = states.recv(), if states_open => match change {
                Some(change) => {
                    if let Some(mut text) = status.update(&change) {
                        if matches!(change, StateChange::Open { .. }) {
                            // The transport is the driver's fact, not the state change's.
                            tokio::select! {
                                _ = shutdown.cancelled() => break,
                                st = tokio::time::timeout(TRANSPORT_LIMIT, session.status()) => {
                                    if let Ok(Some(st)) = st {
                                        text = with_transport(
                                            text,
                                            st.transport,
                                            st.upgrade_error.as_deref(),
                                        );
                                    }
                                }
                            }
                        }
                        send(&[NotifyState::Status(&text)]);
                    }
                }
                None => states_open = false,
            },
            limit = Keepalive::due(keepalive.as_mut()), if keepalive.is_some() => {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    alive = probe(&session, limit) => {
                        if alive {
                            send(&[NotifyState::Watchdog]);
                        } else {
                            tracing::warn!(
                                "the session loop did not answer within {limit:?}; withholding \
                                 the watchdog keep-alive"
                            );
                        }
                    }
                }
            }
        }
    }
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// When to probe the session for a keep-alive, and how long to wait for its answer.
///
/// A probe every half period, each allowed a quarter: keep-alives then stay at most three
/// quarters of a period apart while the daemon is healthy, leaving systemd's deadline a
/// margin for scheduling delays.
struct Keepalive {
    tick: tokio::time::Interval,
    limit: Duration,
}

impl Keepalive {
    fn new(period: Duration) -> Keepalive {
        let mut tick = tokio::time::interval(period / 2);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Keepalive {
            tick,
            limit: period / 4,
        }
    }

    /// Waits for the next probe (forever without a watchdog); returns its time limit.
    async fn due(keepalive: Option<&mut Keepalive>) -> Duration {
        match keepalive {
            Some(k) => {
                k.tick.tick().await;
                k.limit
            }
            None => std::future::pending().await,
        }
    }
}

/// How long the status line for an open connection waits to learn its transport.
const TRANSPORT_LIMIT: Duration = Duration::from_secs(1);

/// An "open" status line with the transport, when it is not plain WebSocket, and why the
/// upgrade failed.
fn with_transport(text: String, transport: Option<&str>, why: Option<&str>) -> String {
    match (transport, why) {
        (Some("long-poll"), Some(why)) => {
            format!("{text} over HTTP long polling (the WebSocket upgrade failed: {why})")
        }
        (Some("long-poll"), None) => format!("{text} over HTTP long polling"),
        _ => text,
    }
}

/// Whether the session loop answers a status request within `limit`.
///
/// The keep-alive must mean "the daemon still works", not "a timer still fires": the
/// request goes through the session's bounded mailbox and its loop, so a wedged or dead
/// driver stops the keep-alives and systemd restarts the daemon. That loop never waits on
/// the server (it writes through a queue and stops only reading when the hub is behind),
/// so an upstream stall does not stop them; a notice loop that takes nothing at all does,
/// since the driver then stops taking requests.
async fn probe(session: &SessionHandle, limit: Duration) -> bool {
    matches!(
        tokio::time::timeout(limit, session.status()).await,
        Ok(Some(_))
    )
}

/// Turns state changes into the one-line status `systemctl status` shows.
///
/// A failure is followed by a wait and a new attempt; the lines for those carry the last
/// failure's reason, since "reconnecting in 3.2 s" alone does not say what is wrong.
#[derive(Debug, Default)]
struct Status {
    last_failure: Option<Failure>,
}

/// Why the last attempt or connection ended, and with which server when it is known.
#[derive(Debug)]
struct Failure {
    url: Option<Url>,
    reason: String,
}

impl Failure {
    /// The failure as seen from an attempt on `next` (the server is named when it differs).
    fn describe(&self, next: Option<&Url>) -> String {
        match &self.url {
            Some(url) if Some(url) != next => format!("{url}: {}", self.reason),
            _ => self.reason.clone(),
        }
    }
}

impl Status {
    /// The new status line, or `None` when the change only adds to the next line.
    fn update(&mut self, change: &StateChange) -> Option<String> {
        match change {
            StateChange::Connecting { url } => Some(match &self.last_failure {
                Some(f) => format!(
                    "connecting to {url} (last failure: {})",
                    f.describe(Some(url))
                ),
                None => format!("connecting to {url}"),
            }),
            StateChange::Open { url } => {
                self.last_failure = None;
                Some(format!("open {url}"))
            }
            StateChange::ConnectFailed { url, reason } => {
                self.last_failure = Some(Failure {
                    url: Some(url.clone()),
                    reason: reason.clone(),
                });
                None
            }
            StateChange::Closed { reason } => {
                self.last_failure = Some(Failure {
                    url: None,
                    reason: reason.clone(),
                });
                Some(format!("connection lost: {reason}"))
            }
            StateChange::Moved { from, to } => Some(format!("moved by {from} to {to}")),
            StateChange::Reconnecting { after } => {
                let secs = after.as_secs_f64();
                Some(match &self.last_failure {
                    Some(f) => format!("reconnecting in {secs:.1} s: {}", f.describe(None)),
                    None => format!("reconnecting in {secs:.1} s"),
                })
            }
            StateChange::Stopped => Some("stopped".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn open_lines_name_a_long_poll_fallback() {
        let open = || "open ws://a/".to_owned();
        assert_eq!(
            with_transport(open(), Some("websocket"), None),
            "open ws://a/"
        );
        assert_eq!(
            with_transport(open(), Some("long-poll"), Some("HTTP error: 200 OK")),
            "open ws://a/ over HTTP long polling (the WebSocket upgrade failed: HTTP error: 200 OK)"
        );
        assert_eq!(
            with_transport(open(), Some("long-poll"), None),
            "open ws://a/ over HTTP long polling"
        );
    }

    #[test]
    fn status_lines_carry_the_last_failure() {
        let mut st = Status::default();
        let a = url("ws://a.example:1/");
        assert_eq!(
            st.update(&StateChange::Connecting { url: a.clone() }),
            Some("connecting to ws://a.example:1/".into())
        );
        assert_eq!(
            st.update(&StateChange::ConnectFailed {
                url: a.clone(),
                reason: "connection refused".into()
            }),
            None
        );
        assert_eq!(
            st.update(&StateChange::Reconnecting {
                after: Duration::from_millis(3_240)
            }),
            Some("reconnecting in 3.2 s: ws://a.example:1/: connection refused".into())
        );
        assert_eq!(
            st.update(&StateChange::Connecting { url: a.clone() }),
            Some("connecting to ws://a.example:1/ (last failure: connection refused)".into())
        );
        assert_eq!(
            st.update(&StateChange::Open { url: a.clone() }),
            Some("open ws://a.example:1/".into())
        );
        // Another server's failure names it.
        let b = url("ws://b.example:2/");
        st.update(&StateChange::ConnectFailed {
            url: b,
            reason: "timed out".into(),
        });
        assert_eq!(
            st.update(&StateChange::Connecting { url: a.clone() }),
            Some(
                "connecting to ws://a.example:1/ (last failure: ws://b.example:2/: timed out)"
                    .into()
            )
        );
        st.update(&StateChange::Open { url: a.clone() });
        // An open connection forgets older failures.
        assert_eq!(
            st.update(&StateChange::Reconnecting {
                after: Duration::from_millis(100)
            }),
            Some("reconnecting in 0.1 s".into())
        );
        assert_eq!(
            st.update(&StateChange::Closed {
                reason: "ping timeout".into()
            }),
            Some("connection lost: ping timeout".into())
        );
        assert_eq!(
            st.update(&StateChange::Reconnecting {
                after: Duration::from_secs(25)
            }),
            Some("reconnecting in 25.0 s: ping timeout".into())
        );
        assert_eq!(st.update(&StateChange::Stopped), Some("stopped".into()));
    }
}
