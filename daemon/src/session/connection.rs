//! Owns the connection's life: connecting and the handshake per dialect (with the
//! dialect's detection), the servers and their order, moves (and the rule that a move
//! never drops TLS unless allowed), losing a connection, and the backoff between attempts
//! (reset only after a connection that stayed up `stable_after`).

use super::*;

impl<T> Session<T> {
    /// The server answered the TCP (and TLS) connect of the current attempt: from here on
    /// a failing WebSocket is a broken upgrade (see [`Session::handle_upgrade_failed`]),
    /// not network trouble.
    pub fn handle_reached(&mut self) {
        if let Phase::Connecting { reached, .. } = &mut self.phase {
            *reached = true;
        }
    }

    /// The transport connected; the session starts the Quick.IO handshake (0.2), or is
    /// open at once (0.1 has no handshake beyond the upgrade).
    pub fn handle_connected(&mut self, now: Instant) {
        if let Phase::Connecting { url, deadline, .. } = &self.phase {
            self.phase = Phase::Handshaking {
                url: url.clone(),
                deadline: *deadline,
            };
            self.in_use = Some(self.transport);
            if self.transport == Transport::WebSocket {
                self.upgrade_error = None;
            }
            match self.dialect {
                Dialect::V02 => self.out.push_back(Output::Send(codec::OHAI.to_owned())),
                Dialect::V01 => self.go_open(now),
            }
        }
    }

    /// The connection attempt failed before it reached the server: network trouble (DNS,
    /// a refused or unreachable connect, TLS), which long polling would meet too.
    pub fn handle_connect_failed(&mut self, now: Instant, reason: &str) {
        if matches!(
            self.phase,
            Phase::Connecting { .. } | Phase::Handshaking { .. }
        ) {
            self.attempt_failed(now, reason.to_owned(), false);
        }
    }

    /// The server was reached but the upgrade failed. `other_dialect` says the failure
    /// shows the other dialect, such as a server that does not echo the `quickio`
    /// subprotocol (a 0.1 server never does): with `dialect = "auto"` the session tries
    /// 0.1 then. Otherwise, with `transport = "auto"`, it falls back to long polling at
    /// once on the same address.
    pub fn handle_upgrade_failed(&mut self, now: Instant, reason: &str, other_dialect: bool) {
        let url = match &self.phase {
            Phase::Connecting { url, .. } | Phase::Handshaking { url, .. } => url.clone(),
            _ => return,
        };
        if other_dialect && self.may_try_v01(&url) {
            self.attempt_failed(now, reason.to_owned(), true);
        } else {
            self.upgrade_failed(now, reason.to_owned(), other_dialect);
        }
    }

    /// The transport was closed or broke; `reason` says how.
    pub fn handle_closed(&mut self, now: Instant, reason: &str) {
        match self.phase {
            Phase::Connecting { .. } => self.attempt_failed(now, reason.to_owned(), false),
            Phase::Handshaking { .. } => {
                // A 0.1 server drops a connection whose first frame is /qio/ohai.
                let reason = format!("closed during the handshake: {reason}");
                self.handshake_failed(now, reason, true)
            }
            Phase::Open { .. } => {
                self.lose(now, reason.to_owned(), false);
                self.retry_later(now);
            }
            Phase::Waiting { .. } | Phase::Stopped => {}
        }
    }

    /// Replaces the configured servers (a reload). When the current connection goes to an
    /// address no longer configured, and was not reached through a move, it is closed and
    /// the session reconnects at once to one of the new addresses.
    pub fn set_servers(&mut self, now: Instant, servers: Vec<Url>) {
        if servers.is_empty() || servers == self.cfg.servers {
            return;
        }
        self.cfg.servers = servers;
        self.order.clear();
        self.cursor = 0;
        self.moved_to = None;
        let current = match &self.phase {
            Phase::Connecting { url, .. }
            | Phase::Handshaking { url, .. }
            | Phase::Open { url, .. } => Some(url.clone()),
            Phase::Waiting { .. } | Phase::Stopped => None,
        };
        match current {
            Some(url) if self.cfg.servers.contains(&url) => {}
            Some(_) => {
                if self.is_open() {
                    self.lose(now, "the configured server address changed".into(), true);
                } else {
                    self.out.push_back(Output::Close);
                }
                self.backoff.reset();
                self.start_connect(now);
            }
            None => {
                if matches!(self.phase, Phase::Waiting { .. }) {
                    self.backoff.reset();
                    self.start_connect(now);
                }
            }
        }
    }

    pub(super) fn moved(&mut self, now: Instant, data: &RawValue) {
        let Phase::Open { url, .. } = &self.phase else {
            return;
        };
        let from = url.clone();
        // A server that moves us on before the connection proved stable (a move loop, or
        // two servers sending clients to each other) must not make us reconnect as fast
        // as we can.
        if self.is_stable(now) {
            self.quick_moves = 0;
        } else {
            self.quick_moves += 1;
        }
        let target = serde_json::from_str::<String>(data.get())
            .map_err(|_| format!("move data {} is not a string", data.get()))
            .and_then(|t| resolve_move(&from, &t));
        let to = match target {
            Ok(to) => to,
            Err(e) => {
                tracing::warn!("ignoring a move the server asked for: {e}");
                self.last_error = Some(e);
                return;
            }
        };
        if drops_tls(&from, &to) && !self.cfg.allow_insecure_move {
            // The server wants us gone, but not to where it says: back to the configured
            // servers, as after a move target that cannot be reached.
            let reason = format!(
                "refused a move from {from} to {to}: it would drop TLS \
                 (set allow_insecure_move = true to follow such moves)"
            );
            tracing::warn!("{reason}");
            self.moved_to = None;
            self.lose(now, reason, true);
        } else {
            self.out.push_back(Output::State(StateChange::Moved {
                from,
                to: to.clone(),
            }));
            self.moved_to = Some(to.clone());
            // The new server may speak the other dialect: detect afresh.
            self.detected.clear();
            self.lose(now, format!("moved to {to}"), true);
        }
        if self.quick_moves < MAX_QUICK_MOVES {
            // A move is not a failure: go to the new server at once.
            self.start_connect(now);
        } else {
            tracing::warn!(
                moves = self.quick_moves,
                "the servers keep moving us right after connecting; backing off"
            );
            self.retry_later(now);
        }
    }

    /// Whether the open connection has lasted long enough to count as good.
    pub(super) fn is_stable(&self, now: Instant) -> bool {
        match &self.phase {
            Phase::Open { since, .. } => {
                now.saturating_duration_since(*since) >= self.cfg.stable_after
            }
            _ => false,
        }
    }

    pub(super) fn invalid_frame(&mut self, now: Instant, text: &str, e: DecodeError) {
        let shown: String = text.chars().take(64).collect();
        self.lose(
            now,
            format!("invalid frame from the server ({e}): {shown:?}"),
            true,
        );
        self.retry_later(now);
    }

    pub(super) fn go_open(&mut self, now: Instant) {
        let Phase::Handshaking { url, .. } = &self.phase else {
            return;
        };
        let url = url.clone();
        if self.cfg.dialect == DialectChoice::Auto {
            self.detected.insert(url.clone(), self.dialect);
        }
        // The backoff starts over only when this connection proves stable (see `lose`):
        // a server that greets and then drops us must not be hammered.
        self.conn += 1;
        self.next_cb = 1;
        self.opened += 1;
        self.phase = Phase::Open {
            url: url.clone(),
            since: now,
        };
        self.heartbeat_at = Some(now + self.cfg.heartbeat_interval);
        self.restore_subscriptions();
        let queued: Vec<_> = self.queue.drain().collect();
        let dropped_before = self.events_dropped;
        for event in queued {
            let frame = self.dialect.encode(&event.path, 0, &event.data);
            if let Err(e) = self.check_size(&frame) {
                // Only when the dialect changed since it was queued (0.1's smaller limit).
                let why = format!(
                    "queued while offline, then the server turned out to speak Quick.IO {}: {e}",
                    self.dialect.name()
                );
                self.drop_event(event, e.code(), why);
                continue;
            }
            self.events_out += 1;
            self.out.push_back(Output::Send(frame));
            if self.cfg.fire_and_forget == FireAndForget::Once {
                continue;
            }
            // The queue and this table have the same bounds, and this one is empty now.
            if let Err(event) = self.unconfirmed.push(self.next_cb, event) {
                // Unreachable with equal bounds; should it happen, the event was still sent
                // once, only not kept for another replay.
                tracing::debug!(
                    path = event.path,
                    "no room to keep a sent event for a replay"
                );
            } else if self.confirm_at.is_none() {
                self.confirm_at = Some(now + CONFIRM_AFTER.min(self.cfg.heartbeat_interval));
            }
        }
        if self.events_dropped > dropped_before {
            tracing::warn!(
                events = self.events_dropped - dropped_before,
                dialect = self.dialect.name(),
                "dropped queued events too large for the server's frame limit; their senders were told"
            );
        }
        self.out.push_back(Output::State(StateChange::Open { url }));
    }

    pub(super) fn start_connect(&mut self, now: Instant) {
        let url = match self.moved_to.clone() {
            Some(url) => url,
            None => {
                if self.cursor >= self.order.len() {
                    self.order = (0..self.cfg.servers.len()).collect();
                    self.order.shuffle(&mut self.rng);
                    self.cursor = 0;
                }
                let i = self.order[self.cursor];
                self.cursor += 1;
                self.cfg.servers[i].clone()
            }
        };
        let dialect = match self.cfg.dialect {
            DialectChoice::Fixed(d) => d,
            DialectChoice::Auto => self.detected.get(&url).copied().unwrap_or(Dialect::V02),
        };
        self.connect_to(now, url, dialect);
    }

    /// A new attempt: WebSocket first, unless `transport = "long-poll"` (0.2 only).
    pub(super) fn connect_to(&mut self, now: Instant, url: Url, dialect: Dialect) {
        let transport = match (self.cfg.transport, dialect) {
            (TransportChoice::LongPoll, Dialect::V02) => Transport::LongPoll,
            _ => Transport::WebSocket,
        };
        self.dialect = dialect;
        self.last_url = Some(url.clone());
        self.out
            .push_back(Output::State(StateChange::Connecting { url: url.clone() }));
        self.attempt(now, url, transport);
    }

    fn attempt(&mut self, now: Instant, url: Url, transport: Transport) {
        self.transport = transport;
        self.phase = Phase::Connecting {
            url: url.clone(),
            deadline: now + self.cfg.handshake_timeout,
            reached: false,
        };
        let dialect = self.dialect;
        self.out.push_back(Output::Connect {
            url,
            dialect,
            transport,
        });
    }

    /// Whether a failure that shows the other dialect should make the session try 0.1.
    fn may_try_v01(&self, url: &Url) -> bool {
        self.cfg.dialect == DialectChoice::Auto
            && self.dialect == Dialect::V02
            && !self.detected.contains_key(url)
    }

    /// The 0.2 handshake failed after the transport connected (closed, broke, a frame
    /// other than `/qio/ohai`, or none in time). Over a WebSocket the upgrade did succeed,
    /// so the server is not 0.1 (a 0.1 server never echoes the subprotocol): something
    /// between us breaks the WebSocket after its upgrade, and long polling may pass.
    pub(super) fn handshake_failed(&mut self, now: Instant, reason: String, dialect_sign: bool) {
        self.out.push_back(Output::Close);
        self.upgrade_failed(now, reason, dialect_sign);
    }

    /// Falls back to long polling at once on the same address when the rules allow it
    /// (0.2, `transport = "auto"`, and this attempt was a WebSocket); otherwise the
    /// attempt failed, `dialect_sign` as for [`Session::attempt_failed`].
    pub(super) fn upgrade_failed(&mut self, now: Instant, reason: String, dialect_sign: bool) {
        let url = match &self.phase {
            Phase::Connecting { url, .. } | Phase::Handshaking { url, .. } => url.clone(),
            _ => return,
        };
        let may_long_poll = self.dialect == Dialect::V02
            && self.cfg.transport == TransportChoice::Auto
            && self.transport == Transport::WebSocket;
        if !may_long_poll {
            self.attempt_failed(now, reason, dialect_sign);
            return;
        }
        tracing::warn!(
            %url,
            "the WebSocket upgrade failed ({reason}); using HTTP long polling until this \
             connection ends"
        );
        self.upgrade_error = Some(reason);
        self.fallback_sign = dialect_sign;
        self.attempt(now, url, Transport::LongPoll);
    }

    /// An attempt failed; `dialect_sign` says the failure looks like the other dialect.
    pub(super) fn attempt_failed(&mut self, now: Instant, reason: String, dialect_sign: bool) {
        let url = match &self.phase {
            Phase::Connecting { url, .. } | Phase::Handshaking { url, .. } => url.clone(),
            _ => return,
        };
        // A fallback that failed too keeps the sign of the WebSocket failure that caused
        // it: a handshake dropped after the upgrade may still be a 0.1 server behind
        // something that added the subprotocol, and 0.1 has no long polling.
        let fell_back = self.transport == Transport::LongPoll && self.upgrade_error.is_some();
        let dialect_sign = dialect_sign || (fell_back && self.fallback_sign);
        if dialect_sign && self.may_try_v01(&url) {
            tracing::info!(%url, "not a Quick.IO 0.2 server ({reason}); trying 0.1");
            self.connect_to(now, url, Dialect::V01);
            return;
        }
        let mut reason = match &self.upgrade_error {
            Some(why) if fell_back => {
                format!("the WebSocket upgrade failed ({why}), and so did long polling: {reason}")
            }
            _ => reason,
        };
        if self.dialect == Dialect::V01 && !url.path().contains("/qio") {
            reason.push_str(
                " (a Quick.IO 0.1 server needs /qio in the address, like ws://host:port/qio)",
            );
        }
        if self.moved_to.as_ref() == Some(&url) {
            // A moved-to server that cannot be reached sends us back to the configured ones.
            self.moved_to = None;
        }
        self.last_error = Some(format!("{url}: {reason}"));
        self.out
            .push_back(Output::State(StateChange::ConnectFailed { url, reason }));
        self.retry_later(now);
    }

    pub(super) fn retry_later(&mut self, now: Instant) {
        let after = self.backoff.next_delay(&mut self.rng);
        self.phase = Phase::Waiting { until: now + after };
        self.out
            .push_back(Output::State(StateChange::Reconnecting { after }));
    }

    /// The open connection is gone: fail callbacks at once and keep subscriptions for the
    /// reconnect, which the caller schedules.
    ///
    /// A connection that lasted `stable_after` was a good one: the backoff and the move
    /// count start over. One that did not leaves both growing, so a server that greets
    /// and drops is retried ever more slowly.
    ///
    /// With `fire_and_forget = "at-least-once"`, events the server was not seen to read go
    /// first after the reconnect, however many breaks it takes (an event read just before
    /// a break arrives twice). Even a server that closes or moves us on purpose may not
    /// have read what was in flight, so its close frame or move does not end the replay.
    /// By default nothing written is kept.
    pub(super) fn lose(&mut self, now: Instant, reason: String, close: bool) {
        if self.is_stable(now) {
            self.backoff.reset();
            self.quick_moves = 0;
        }
        if close {
            self.out.push_back(Output::Close);
        }
        self.confirm_at = None;
        self.confirm_ping = None;
        let unconfirmed = self.unconfirmed.take();
        if !unconfirmed.is_empty() {
            tracing::info!(
                events = unconfirmed.len(),
                "sending again after the reconnect: events the server may not have read"
            );
            // The queue is empty while open and has the same bounds, so all fit.
            let refused = self.queue.push_front(unconfirmed);
            if !refused.is_empty() {
                tracing::warn!(
                    events = refused.len(),
                    "the offline queue is full: dropping events to be sent again; their senders were told"
                );
            }
            for event in refused {
                let why = "the offline queue is full (queue_max_events/queue_max_bytes): \
                           an event sent before the connection broke cannot be sent again"
                    .to_owned();
                self.drop_event(event, code::OVERLOADED, why);
            }
        }
        self.fail_pending();
        self.subscriptions_offline();
        self.heartbeat_at = None;
        self.ping_deadline = None;
        self.last_error = Some(reason.clone());
        self.out
            .push_back(Output::State(StateChange::Closed { reason }));
    }
}
