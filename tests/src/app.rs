//! The conformance app: what the server does with subscriptions and application events,
//! including the `/clienttest/*` events of the Quick.IO 0.2 client test helper.
//!
//! The functions here decide; they return [`Action`]s that the connection handler performs in
//! order. That keeps the app free of socket code and wire syntax. Under 0.1 the app is the
//! same except for what 0.1 lacks: `/clienttest/in-progress` (pending subscriptions),
//! `/clienttest/on-data` (subscription data) and `/clienttest/heartbeat-challenge` are errors
//! there (`qio_error` on the wire); every non-200 answer becomes `qio_error`, and closes are
//! bare TCP drops.

use crate::codec::{Dialect, Frame, Reply};
use crate::server::{CallbackKind, CloseReason, Inner};
use serde_json::{json, Value};
use std::sync::Arc;

/// Broadcast every `broadcast_interval` to its subscribers.
pub(crate) const BROADCAST: &str = "/clienttest/broadcast";
/// Sending it makes the server close the connection.
const CLOSE: &str = "/clienttest/close";
/// A callback requested on it is never answered.
const DROP_CALLBACK: &str = "/clienttest/drop-callback";
/// Answers with the data sent, requesting a callback back (chains).
const ECHO: &str = "/clienttest/echo";
/// `/clienttest/error/<code>` answers with that code.
const ERROR_PREFIX: &str = "/clienttest/error/";
/// Sends a heartbeat challenge at once.
const HEARTBEAT_CHALLENGE: &str = "/clienttest/heartbeat-challenge";
/// Delayed subscription; the event of the same name approves it.
const IN_PROGRESS: &str = "/clienttest/in-progress";
/// Sends `/qio/move` with the data sent, then closes.
const MOVE: &str = "/clienttest/move";
/// Sends a frame that is not an event.
const SEND_INVALID: &str = "/clienttest/send-invalid";
/// Sends an event on a path the client never subscribed to.
const SEND_UNSUBSCRIBED: &str = "/clienttest/send-unsubscribed";
/// Where `/clienttest/send-unsubscribed` sends its event (as the real server does).
const UNSUBSCRIBED_PATH: &str = "/you/didnt/subscribe/to/this";
/// Subscription accepted only with the data [`ON_DATA_VALUE`].
const ON_DATA: &str = "/clienttest/on-data";
const ON_DATA_VALUE: i64 = 123987;
/// The frame `/clienttest/send-invalid` sends, exactly as the real 0.2 server sends it
/// (empty data after the `=`, which is not an event: empty is not a spelling of `null`).
pub(crate) const INVALID_FRAME: &str = "unicorns, ponies, princesses, and magic!:good times:0=";
/// The conformance app's paths; of these only [`BROADCAST`], [`IN_PROGRESS`] and
/// [`ON_DATA`] take subscriptions (the others answer 401, as the real server's handlers
/// without a subscribe callback do).
const CLIENTTEST: &str = "/clienttest";

/// One thing for the connection handler to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Answer the client's callback `cb` (nothing if `cb` is 0); with `chain`, the answer
    /// itself requests a callback of that kind.
    Reply {
        cb: u64,
        reply: Reply,
        chain: Option<CallbackKind>,
    },
    /// Send an event without a callback request.
    Send { path: String, data: Value },
    /// Send a heartbeat challenge; once the client answers it, answer the client's callback
    /// `then_reply` (nothing if 0) with 200.
    Challenge { then_reply: u64 },
    /// Send a text frame as is.
    Raw(String),
    /// Close the connection (the handler picks close frame or not from the reason).
    Close(CloseReason),
}

/// Per-connection app state.
#[derive(Debug, Default)]
pub(crate) struct AppState {
    /// `Some(cb)` while the first `/qio/on` for `/clienttest/in-progress` waits for approval;
    /// `cb` is that on's callback id (0 if it asked for none).
    in_progress: Option<u64>,
}

/// Whether `path` is a conformance event (or subscription) that `dialect` lacks.
fn unsupported(dialect: Dialect, path: &str) -> bool {
    match path {
        IN_PROGRESS => !dialect.pending_subscriptions(),
        ON_DATA => !dialect.subscription_data(),
        HEARTBEAT_CHALLENGE => !dialect.heartbeat_challenges(),
        _ => false,
    }
}

/// The answer to a conformance event the dialect lacks (0.1: `qio_error`).
fn not_in_dialect(cb: u64, dialect: Dialect) -> Action {
    reply(cb, Reply::error(404, format!("not in Quick.IO {dialect}")))
}

/// Answers callback `cb` (no-op when 0) without a chain.
pub(crate) fn reply(cb: u64, reply: Reply) -> Action {
    Action::Reply {
        cb,
        reply,
        chain: None,
    }
}

/// Decides a subscribe request (`/qio/on`) for the cleaned `path`.
pub(crate) fn subscribe(
    inner: &Inner,
    conn: u64,
    st: &mut AppState,
    cb: u64,
    path: &str,
    data: Option<&Value>,
) -> Vec<Action> {
    if inner.is_subscribed(conn, path) {
        // The real 0.2 server answers a repeated subscription 200; 0.1 calls it an error.
        return match inner.dialect {
            Dialect::V02 => vec![reply(cb, Reply::ok(Value::Null))],
            Dialect::V01 => vec![reply(cb, Reply::error(400, "already subscribed"))],
        };
    }
    if let Some(code) = inner.refused(path) {
        return vec![reply(cb, Reply::error(code, "subscription refused"))];
    }
    if unsupported(inner.dialect, path) {
        return vec![not_in_dialect(cb, inner.dialect)];
    }
    if path == "/qio" || path.starts_with("/qio/") {
        return vec![reply(cb, Reply::error(404, "not subscribable"))];
    }
    match path {
        IN_PROGRESS => {
            if st.in_progress.is_some() {
                vec![reply(cb, Reply::error(202, "subscription pending"))]
            } else {
                // No answer now: the approval event answers this callback later.
                st.in_progress = Some(cb);
                Vec::new()
            }
        }
        ON_DATA => {
            // as_i64 is None for floats and strings: only the integer itself is accepted.
            if data.and_then(Value::as_i64) == Some(ON_DATA_VALUE) {
                inner.subscribe(conn, path);
                // The real server follows its 200 with an event on the path.
                vec![
                    reply(cb, Reply::ok(Value::Null)),
                    Action::Send {
                        path: ON_DATA.into(),
                        data: Value::Bool(true),
                    },
                ]
            } else {
                vec![reply(
                    cb,
                    Reply::error(401, format!("subscription data must be {ON_DATA_VALUE}")),
                )]
            }
        }
        BROADCAST => {
            inner.subscribe(conn, path);
            inner.wake_ticker();
            vec![reply(cb, Reply::ok(Value::Null))]
        }
        _ if path.starts_with(CLIENTTEST) && path[CLIENTTEST.len()..].starts_with('/') => {
            if is_clienttest_event(path) {
                vec![reply(cb, Reply::error(401, "subscriptions not allowed"))]
            } else {
                vec![reply(cb, Reply::error(404, "not subscribable"))]
            }
        }
        _ if inner.cfg.open_subscriptions => {
            inner.subscribe(conn, path);
            vec![reply(cb, Reply::ok(Value::Null))]
        }
        _ => vec![reply(cb, Reply::error(404, "not subscribable"))],
    }
}

/// Whether `path` is one of the conformance app's events that refuse subscriptions.
fn is_clienttest_event(path: &str) -> bool {
    matches!(
        path,
        CLOSE
            | DROP_CALLBACK
            | ECHO
            | HEARTBEAT_CHALLENGE
            | MOVE
            | SEND_INVALID
            | SEND_UNSUBSCRIBED
    ) || path
        .strip_prefix(ERROR_PREFIX)
        .is_some_and(|c| !c.is_empty())
}

/// Decides an unsubscribe request (`/qio/off`, `/qio/unsub`). Always 200 (0.1: an empty
/// `plain`), even if there was no such subscription: a pending in-progress subscription is
/// deliberately NOT cancelled (that is what the conformance sequence checks).
pub(crate) fn unsubscribe(inner: &Inner, conn: u64, cb: u64, path: &str) -> Vec<Action> {
    inner.unsubscribe(conn, path);
    vec![reply(cb, Reply::ok(Value::Null))]
}

/// Handles an application event (any path outside `/qio/`).
pub(crate) fn event(inner: &Inner, conn: u64, st: &mut AppState, f: &Frame) -> Vec<Action> {
    let cb = if inner.drop_callbacks() { 0 } else { f.cb };
    let path = f.path.as_str();
    let ok_null = || reply(cb, Reply::ok(Value::Null));
    if unsupported(inner.dialect, path) {
        return vec![not_in_dialect(cb, inner.dialect)];
    }
    match path {
        CLOSE => vec![Action::Close(CloseReason::ServerClose)],
        DROP_CALLBACK => Vec::new(),
        ECHO => vec![Action::Reply {
            cb,
            reply: Reply::ok(f.data.clone()),
            chain: Some(CallbackKind::Echo),
        }],
        // The caller's callback is answered only once the challenge is.
        HEARTBEAT_CHALLENGE => vec![Action::Challenge { then_reply: cb }],
        IN_PROGRESS => match st.in_progress.take() {
            // The FIRST on's callback, then this event's.
            Some(on_cb) => {
                inner.subscribe(conn, IN_PROGRESS);
                vec![reply(on_cb, Reply::ok(Value::Null)), ok_null()]
            }
            None => vec![reply(cb, Reply::error(500, "no subscription in progress"))],
        },
        MOVE => vec![
            Action::Send {
                path: "/qio/move".into(),
                data: f.data.clone(),
            },
            Action::Close(CloseReason::Moved),
        ],
        // These never answer the caller's callback, as on the real server.
        SEND_INVALID => vec![Action::Raw(INVALID_FRAME.into())],
        SEND_UNSUBSCRIBED => vec![Action::Send {
            path: UNSUBSCRIBED_PATH.into(),
            data: Value::Null,
        }],
        _ => match path.strip_prefix(ERROR_PREFIX) {
            Some(code) => {
                let reply_for = match code.parse::<i64>() {
                    // err_msg only when the code is not 200, as on the real server.
                    Ok(code) => Reply {
                        code,
                        data: json!("you requested an error?"),
                        err_msg: (code != 200).then(|| format!("{code}s are fun!")),
                    },
                    Err(_) => Reply::error(400, "the error code must be an integer"),
                };
                vec![reply(cb, reply_for)]
            }
            // Anything else: an echo without a chain, so tests can round-trip any event.
            None => vec![reply(cb, Reply::ok(f.data.clone()))],
        },
    }
}

/// Broadcasts a counter on [`BROADCAST`] every `broadcast_interval` while anyone is
/// subscribed, and sleeps on a notification otherwise (no idle wakeups).
pub(crate) async fn broadcast_ticker(inner: Arc<Inner>) {
    let mut counter: u64 = 0;
    loop {
        if inner.subscriber_count(BROADCAST) == 0 {
            // notify_one stores a permit, so a subscribe racing with this check is not lost.
            inner.ticker_wakeup().await;
            continue;
        }
        let mut tick = tokio::time::interval(inner.cfg.broadcast_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate
        loop {
            tick.tick().await;
            if inner.subscriber_count(BROADCAST) == 0 {
                break;
            }
            if inner.is_stalled() {
                continue;
            }
            counter += 1;
            inner.broadcast(BROADCAST, &json!(counter)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_frame_is_not_an_event() {
        assert!(Dialect::V02.parse(INVALID_FRAME).is_err());
        assert!(Dialect::V01.parse(INVALID_FRAME).is_err());
    }

    #[test]
    fn dialect_only_events() {
        for path in [IN_PROGRESS, ON_DATA, HEARTBEAT_CHALLENGE] {
            assert!(unsupported(Dialect::V01, path), "{path}");
            assert!(!unsupported(Dialect::V02, path), "{path}");
        }
        for path in [
            BROADCAST,
            CLOSE,
            DROP_CALLBACK,
            ECHO,
            MOVE,
            SEND_INVALID,
            "/x",
        ] {
            assert!(!unsupported(Dialect::V01, path), "{path}");
        }
    }
}
