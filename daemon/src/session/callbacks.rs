//! Owns callbacks: requests that want the server's answer, answers to the server's own
//! callback requests, and turning each answer (0.2 envelope, 0.1 `qio_error`) into one
//! [`Outcome`] for its caller, exactly once.

use super::*;

impl<T> Session<T> {
    /// Sends an event asking for a callback; `reply` gets the answer, exactly once.
    pub fn request(&mut self, now: Instant, path: &str, data: &RawValue, reply: T) {
        let path = match check_path(path) {
            Ok(p) => p,
            Err(e) => return self.reply(reply, Outcome::local(e.code(), e.to_string())),
        };
        if let Some(outcome) = self.refuse_request() {
            return self.reply(reply, outcome);
        }
        // Checked with the largest id the request could get, before it takes one.
        if let Err(e) = self.check_size(&self.dialect.encode(&path, u64::MAX, data)) {
            return self.reply(reply, Outcome::local(e.code(), e.to_string()));
        }
        let id = self.alloc_request(now, reply);
        self.send(&path, id, data);
    }

    /// Answers a server's callback request; with `reply`, asks for a callback back.
    ///
    /// With a `reply`, every failure goes to it and this returns `Ok`; without one,
    /// failures are returned.
    pub fn answer(
        &mut self,
        now: Instant,
        handle: CbHandle,
        data: &RawValue,
        reply: Option<T>,
    ) -> Result<(), SessionError> {
        let live = self.is_open() && handle.conn == self.conn;
        let path = format!("/qio/callback/{}", handle.id);
        if let Err(e) = self.check_size(&self.dialect.encode(&path, u64::MAX, data)) {
            return match reply {
                Some(reply) => {
                    self.reply(reply, Outcome::local(e.code(), e.to_string()));
                    Ok(())
                }
                None => Err(e),
            };
        }
        match (live, reply) {
            (false, None) => Err(SessionError::Disconnected),
            (false, Some(reply)) => {
                self.reply(reply, Outcome::disconnected());
                Ok(())
            }
            (true, None) => {
                self.send(&path, 0, data);
                Ok(())
            }
            (true, Some(reply)) => {
                if let Some(outcome) = self.refuse_request() {
                    self.reply(reply, outcome);
                } else {
                    let id = self.alloc_request(now, reply);
                    self.send(&path, id, data);
                }
                Ok(())
            }
        }
    }

    pub(super) fn envelope(&self, frame: &codec::Frame) -> Outcome {
        let cb = (frame.cb > 0).then_some(CbHandle {
            conn: self.conn,
            id: frame.cb,
        });
        if self.dialect == Dialect::V01 {
            // 0.1 callbacks carry the data as sent; `qio_error` is the only error.
            return if frame.data.get() == "\"qio_error\"" {
                Outcome {
                    code: 500,
                    data: crate::json::null(),
                    err_msg: Some("qio_error".into()),
                    cb,
                }
            } else {
                Outcome {
                    code: code::OK,
                    data: frame.data.clone(),
                    err_msg: None,
                    cb,
                }
            };
        }
        match serde_json::from_str::<Envelope>(frame.data.get()) {
            Ok(env) => Outcome {
                code: env.code,
                data: env.data.unwrap_or_else(crate::json::null),
                err_msg: env.err_msg.and_then(|m| match m {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(s) => Some(s),
                    other => Some(other.to_string()),
                }),
                cb,
            },
            Err(_) => Outcome {
                code: 500,
                data: frame.data.clone(),
                err_msg: Some("the server's callback had no {code, data} envelope".into()),
                cb,
            },
        }
    }

    pub(super) fn fail_pending(&mut self) {
        for (id, p) in self.pending.drain() {
            if let Pending::Request { reply, deadline } = p {
                self.timers.remove(&(deadline, Timer::Callback(id)));
                self.out
                    .push_back(Output::Reply(reply, Outcome::disconnected()));
            }
        }
        self.user_pending = 0;
    }

    pub(super) fn refuse_request(&self) -> Option<Outcome> {
        match self.phase {
            Phase::Open { .. } if self.user_pending >= self.cfg.max_pending_callbacks => {
                let max = self.cfg.max_pending_callbacks;
                Some(Outcome::local(
                    code::OVERLOADED,
                    format!("too many callbacks waiting (max_pending_callbacks = {max})"),
                ))
            }
            Phase::Open { .. } => None,
            _ => Some(Outcome::disconnected()),
        }
    }

    pub(super) fn alloc_request(&mut self, now: Instant, reply: T) -> u64 {
        let deadline = now + self.cfg.request_timeout;
        let id = self.alloc_cb(Pending::Request { reply, deadline });
        self.timers.insert((deadline, Timer::Callback(id)));
        self.user_pending += 1;
        id
    }

    pub(super) fn alloc_cb(&mut self, p: Pending<T>) -> u64 {
        let id = self.next_cb;
        self.next_cb += 1;
        self.pending.insert(id, p);
        id
    }

    pub(super) fn reply(&mut self, reply: T, outcome: Outcome) {
        self.out.push_back(Output::Reply(reply, outcome));
    }
}
