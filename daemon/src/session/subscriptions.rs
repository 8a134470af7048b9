//! Owns which paths are wanted upstream and their upstream state; who holds them is the
//! hub's business (one owner per fact).
//!
//! The layer above switches a path on with [`Session::want`] when its first local holder
//! or waiter appears and off with [`Session::unwant`] when the last one goes. Each switch
//! carries the owner's generation for the path, and every answer comes back as an
//! [`Output::Subscription`] with the generation it answers, on the same ordered stream as
//! the events: so a confirmation can neither overtake nor be overtaken by the events and
//! state changes it relates to, and the owner drops what belongs to a generation it has
//! already ended. The session keeps no reference counts and no reply targets for
//! subscriptions.

use super::{check_path, code, Outcome, Output, Pending, Session, SessionError};
use crate::codec::Dialect;
use serde_json::value::RawValue;

/// One wanted path.
#[derive(Debug)]
pub(super) struct Sub {
    /// The subscription data of the first want, sent on every (re)subscribe.
    data: Option<Box<RawValue>>,
    /// The owner's generation this path is wanted for.
    gen: u64,
    upstream: Upstream,
}

/// Where a wanted path stands with the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upstream {
    /// Not asked on this connection (none is open, or it was just lost).
    Offline,
    /// `/qio/on` with callback `cb` is on its way. After a 202 for it, the server's final
    /// answer comes on an earlier `on` for the path (sent before an `off`), so answers to
    /// earlier callbacks count too.
    Asked { cb: u64, or_earlier: bool },
    /// The server confirmed it.
    Active,
}

impl<T> Session<T> {
    /// Wants `path` upstream for generation `gen` of its owner; the answer comes as an
    /// [`Output::Subscription`] carrying `gen`: 200 once the server confirmed it (at once
    /// when it already is), or the refusal, after which the path is not wanted any more.
    ///
    /// While offline the path is recorded and asked for when a connection opens. A want
    /// for a path already wanted keeps its upstream subscription and its data, and only
    /// moves it to the newer generation; a want older than the current one is stale and
    /// ignored. The caller times out its own waiting requests and unwants the path then.
    pub fn want(&mut self, path: &str, data: Option<&RawValue>, gen: u64) {
        let clean = match check_path(path) {
            Ok(p) => p,
            Err(e) => return self.sub_answer(path, gen, Outcome::local(e.code(), e.to_string())),
        };
        if self.is_stopped() {
            let e = SessionError::Stopped;
            return self.sub_answer(&clean, gen, Outcome::local(e.code(), e.to_string()));
        }
        if let Some(sub) = self.subs.get_mut(&clean) {
            if gen <= sub.gen {
                return;
            }
            sub.gen = gen;
            if sub.upstream == Upstream::Active {
                self.sub_answer(&clean, gen, Outcome::ok());
            }
            return;
        }
        if self.subs.len() >= self.cfg.max_subscriptions {
            let max = self.cfg.max_subscriptions;
            let msg = format!("too many subscriptions (max_subscriptions = {max})");
            return self.sub_answer(&clean, gen, Outcome::local(code::OVERLOADED, msg));
        }
        if self.is_open() && self.sub_asks >= self.cfg.max_subscriptions {
            // Answers to subscriptions switched off and on again may still be due: the
            // table of asked callbacks is bounded like the subscriptions themselves.
            let max = self.cfg.max_subscriptions;
            let msg = format!(
                "too many subscription requests waiting for the server (max_subscriptions = {max})"
            );
            return self.sub_answer(&clean, gen, Outcome::local(code::OVERLOADED, msg));
        }
        self.subs.insert(
            clean.clone(),
            Sub {
                data: data.map(ToOwned::to_owned),
                gen,
                upstream: Upstream::Offline,
            },
        );
        if self.is_open() {
            self.send_on(&clean);
        }
    }

    /// Ends generation `gen` of `path`: the server is told when it holds or was asked for
    /// the path. An unwant for any other generation is stale and ignored.
    pub fn unwant(&mut self, path: &str, gen: u64) {
        let path = qio_ipc::clean_path(path);
        if self.subs.get(&path).is_none_or(|s| s.gen != gen) {
            return;
        }
        if let Some(sub) = self.subs.remove(&path) {
            if sub.upstream != Upstream::Offline && self.is_open() {
                self.out
                    .push_back(Output::Send(self.dialect.unsubscribe(&path)));
            }
        }
    }

    /// Asks the server for every wanted path (after a handshake), in path order.
    pub(super) fn restore_subscriptions(&mut self) {
        let mut paths: Vec<String> = self.subs.keys().cloned().collect();
        paths.sort();
        for path in paths {
            self.send_on(&path);
        }
    }

    /// The connection is gone: every wanted path waits for the next one.
    pub(super) fn subscriptions_offline(&mut self) {
        self.sub_asks = 0;
        for sub in self.subs.values_mut() {
            sub.upstream = Upstream::Offline;
        }
    }

    /// The server answered the `/qio/on` with callback `cb`.
    pub(super) fn subscription_answer(&mut self, cb: u64, path: &str, outcome: Outcome) {
        self.sub_asks = self.sub_asks.saturating_sub(1);
        let Some(sub) = self.subs.get_mut(path) else {
            if outcome.code == code::OK && self.is_open() {
                // Confirmed after the path was given up (a server that approves late):
                // give it back upstream too.
                self.out
                    .push_back(Output::Send(self.dialect.unsubscribe(path)));
            }
            return;
        };
        let Upstream::Asked {
            cb: asked,
            or_earlier,
        } = sub.upstream
        else {
            return;
        };
        let current = cb == asked || (or_earlier && cb < asked);
        if !current {
            tracing::debug!(
                path,
                cb,
                "answer to an earlier subscription request; dropped"
            );
            return;
        }
        let gen = sub.gen;
        match outcome.code {
            // The server still has an earlier `on` for the path: its answer is final.
            code::PENDING if cb == asked => {
                sub.upstream = Upstream::Asked {
                    cb: asked,
                    or_earlier: true,
                };
            }
            code::PENDING => {}
            code::OK => {
                sub.upstream = Upstream::Active;
                self.sub_answer(path, gen, outcome);
            }
            _ => {
                self.subs.remove(path);
                self.sub_answer(path, gen, outcome);
            }
        }
    }

    /// The upstream state of every wanted path, for `status`: `(path, state)`.
    pub(super) fn subscription_states(&self) -> Vec<(String, &'static str)> {
        let mut v: Vec<_> = self
            .subs
            .iter()
            .map(|(path, sub)| {
                let state = match sub.upstream {
                    Upstream::Active => "active",
                    Upstream::Asked { .. } => "pending",
                    Upstream::Offline => "offline",
                };
                (path.clone(), state)
            })
            .collect();
        v.sort();
        v
    }

    fn send_on(&mut self, path: &str) {
        let Some(sub) = self.subs.get(path) else {
            return;
        };
        if sub.data.is_some() && self.dialect == Dialect::V01 {
            let gen = sub.gen;
            self.subs.remove(path);
            let msg = "subscription data needs a Quick.IO 0.2 server; this one speaks 0.1";
            return self.sub_answer(path, gen, Outcome::local(code::BAD_REQUEST, msg));
        }
        let id = self.alloc_cb(Pending::Subscribe {
            path: path.to_owned(),
        });
        self.sub_asks += 1;
        let data = self.subs.get(path).and_then(|s| s.data.as_deref());
        let frame = self.dialect.subscribe(id, path, data);
        if let Some(sub) = self.subs.get_mut(path) {
            sub.upstream = Upstream::Asked {
                cb: id,
                or_earlier: false,
            };
        }
        self.out.push_back(Output::Send(frame));
    }

    fn sub_answer(&mut self, path: &str, gen: u64, outcome: Outcome) {
        self.out.push_back(Output::Subscription {
            path: path.to_owned(),
            gen,
            outcome,
        });
    }
}
