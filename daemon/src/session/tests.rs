//! Table-driven tests of the pure session: every rule, no sockets, no real time.

use super::*;

const T0: Duration = Duration::ZERO;

struct Harness {
    s: Session<u32>,
    t0: Instant,
    now: Instant,
}

fn cfg(servers: &[&str]) -> SessionConfig {
    let servers = servers.iter().map(|s| Url::parse(s).unwrap()).collect();
    let mut c = SessionConfig::new(servers);
    c.queue_max_events = 3;
    c.queue_max_bytes = 1000;
    c
}

fn raw(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_owned()).unwrap()
}

impl Harness {
    fn new(c: SessionConfig) -> Self {
        let t0 = Instant::now();
        let s = Session::new(c, 1, t0).unwrap();
        Harness { s, t0, now: t0 }
    }

    fn open() -> Self {
        let mut h = Harness::new(cfg(&["ws://a.test/"]));
        h.handshake();
        h
    }

    fn handshake(&mut self) -> Vec<Output<u32>> {
        self.s.handle_connected(self.now);
        let outs = self.drain();
        assert_eq!(sent(&outs), ["/qio/ohai"]);
        self.s.handle_frame(self.now, "/qio/ohai");
        self.drain()
    }

    fn drain(&mut self) -> Vec<Output<u32>> {
        std::iter::from_fn(|| self.s.poll_output()).collect()
    }

    fn at(&mut self, d: Duration) {
        self.now = self.t0 + d;
        self.s.handle_timeout(self.now);
    }

    /// After a break: waits out the backoff, if any, until the session connects again.
    fn reconnect(&mut self) {
        let outs = self.drain();
        if outs.iter().any(|o| matches!(o, Output::Connect { .. })) {
            return;
        }
        let next = self.s.poll_timeout().expect("a retry is scheduled");
        self.at(next - self.t0);
        let outs = self.drain();
        assert!(
            outs.iter().any(|o| matches!(o, Output::Connect { .. })),
            "{:?}",
            kinds(&outs)
        );
    }

    fn frame(&mut self, text: &str) {
        self.s.handle_frame(self.now, text);
    }
}

fn sent(outs: &[Output<u32>]) -> Vec<&str> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Send(s) => Some(s.as_str()),
            _ => None,
        })
        .collect()
}

fn replies(outs: &[Output<u32>]) -> Vec<(u32, i64)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Reply(t, out) => Some((*t, out.code)),
            _ => None,
        })
        .collect()
}

/// The subscription answers: (path, generation, code).
fn subs(outs: &[Output<u32>]) -> Vec<(&str, u64, i64)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Subscription { path, gen, outcome } => {
                Some((path.as_str(), *gen, outcome.code))
            }
            _ => None,
        })
        .collect()
}

fn states(outs: &[Output<u32>]) -> Vec<&StateChange> {
    outs.iter()
        .filter_map(|o| match o {
            Output::State(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn kinds(outs: &[Output<u32>]) -> Vec<&'static str> {
    outs.iter()
        .map(|o| match o {
            Output::Connect { .. } => "connect",
            Output::Send(_) => "send",
            Output::Close => "close",
            Output::Reply(..) => "reply",
            Output::Event(_) => "event",
            Output::Subscription { .. } => "subscription",
            Output::Dropped { .. } => "dropped",
            Output::State(StateChange::Connecting { .. }) => "connecting",
            Output::State(StateChange::Open { .. }) => "open",
            Output::State(StateChange::ConnectFailed { .. }) => "failed",
            Output::State(StateChange::Closed { .. }) => "closed",
            Output::State(StateChange::Moved { .. }) => "moved",
            Output::State(StateChange::Reconnecting { .. }) => "reconnecting",
            Output::State(StateChange::Stopped) => "stopped",
        })
        .collect()
}

#[test]
fn opens_only_after_ohai() {
    let mut h = Harness::new(cfg(&["ws://a.test/"]));
    assert_eq!(kinds(&h.drain()), ["connecting", "connect"]);
    h.s.handle_connected(h.now);
    let outs = h.drain();
    assert_eq!(sent(&outs), ["/qio/ohai"]);
    assert!(!h.s.is_open(), "not open before the server's ohai");
    h.frame("/qio/ohai");
    assert_eq!(kinds(&h.drain()), ["open"]);
    assert!(h.s.is_open());
}

#[test]
fn a_server_that_does_not_say_ohai_fails_the_attempt() {
    let mut c = cfg(&["ws://a.test/"]);
    c.dialect = DialectChoice::Fixed(Dialect::V02);
    c.transport = TransportChoice::WebSocket;
    let mut h = Harness::new(c);
    h.drain();
    h.s.handle_connected(h.now);
    h.drain();
    h.frame("/qio/heartbeat:0=null");
    let outs = h.drain();
    assert_eq!(kinds(&outs), ["close", "failed", "reconnecting"]);
    assert!(h
        .s
        .status(h.now)
        .last_error
        .unwrap()
        .contains("instead of /qio/ohai"));
}

#[test]
fn handshake_timeout_fails_the_attempt() {
    let mut c = cfg(&["ws://a.test/"]);
    c.transport = TransportChoice::WebSocket;
    let mut h = Harness::new(c);
    h.drain();
    h.s.handle_connected(h.now);
    h.drain();
    h.at(Duration::from_secs(9));
    assert!(h.drain().is_empty());
    h.at(Duration::from_secs(10));
    assert_eq!(kinds(&h.drain()), ["close", "failed", "reconnecting"]);
}

#[test]
fn callbacks_count_from_one_per_connection_and_carry_the_envelope() {
    let mut h = Harness::open();
    h.s.request(h.now, "/app/a", &raw("1"), 10);
    h.s.request(h.now, "/app/@b", &raw("{\"x\":2}"), 11);
    assert_eq!(sent(&h.drain()), ["/app/a:1=1", "/app/b:2={\"x\":2}"]);
    h.frame("/qio/callback/2:5={\"code\":404,\"data\":\"d\",\"err_msg\":\"nope\"}");
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":[1]}");
    let outs = h.drain();
    let got: Vec<_> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Reply(t, o) => Some((*t, o.code, o.data.get(), o.err_msg.clone(), o.cb)),
            _ => None,
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                11,
                404,
                "\"d\"",
                Some("nope".into()),
                Some(CbHandle { conn: 1, id: 5 })
            ),
            (10, 200, "[1]", None, None),
        ]
    );
    // After a reconnect, ids start over at 1.
    h.s.handle_closed(h.now, "gone");
    h.at(Duration::from_secs(1));
    h.drain();
    h.handshake();
    h.s.request(h.now, "/app/a", &raw("null"), 12);
    assert_eq!(sent(&h.drain()), ["/app/a:1=null"]);
}

#[test]
fn every_request_resolves_exactly_once() {
    // (what happens after the request, the code its caller gets)
    type Step = fn(&mut Harness);
    let cases: [(&str, Step, i64); 5] = [
        (
            "answered",
            |h| h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}"),
            200,
        ),
        (
            "connection lost",
            |h| h.s.handle_closed(h.now, "boom"),
            code::DISCONNECTED,
        ),
        (
            "timed out",
            |h| h.at(Duration::from_secs(30)),
            code::TIMEOUT,
        ),
        ("invalid frame", |h| h.frame("garbage"), code::DISCONNECTED),
        ("shutdown", |h| h.s.shutdown(), code::DISCONNECTED),
    ];
    for (name, step, want) in cases {
        let mut h = Harness::open();
        h.s.request(h.now, "/app/x", &raw("null"), 7);
        h.drain();
        step(&mut h);
        let mut got = replies(&h.drain());
        // Nothing that happens afterwards answers it again.
        h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}");
        h.s.handle_closed(h.now, "again");
        h.at(Duration::from_secs(100));
        got.extend(replies(&h.drain()));
        assert_eq!(got, [(7, want)], "{name}");
    }
}

#[test]
fn requests_while_offline_fail_at_once_and_emits_are_queued() {
    let mut h = Harness::new(cfg(&["ws://a.test/"]));
    h.drain();
    h.s.request(h.now, "/app/x", &raw("null"), 1);
    assert_eq!(replies(&h.drain()), [(1, code::DISCONNECTED)]);
    h.s.emit(h.now, "/app/e1", &raw("1")).unwrap();
    h.s.emit(h.now, "/app/e2", &raw("2")).unwrap();
    h.s.want("/news", None, 2);
    assert_eq!(h.s.status(h.now).queued_events, 2);
    let outs = h.handshake();
    // Re-subscribe first, then the queue in order, then report open.
    assert_eq!(
        kinds(&outs),
        ["send", "send", "send", "open"],
        "order after the handshake"
    );
    assert_eq!(
        sent(&outs),
        ["/qio/on:1=\"/news\"", "/app/e1:0=1", "/app/e2:0=2"]
    );
}

#[test]
fn the_offline_queue_is_bounded_and_says_so() {
    let mut h = Harness::new(cfg(&["ws://a.test/"]));
    for i in 0..3 {
        h.s.emit(h.now, "/app/e", &raw(&i.to_string())).unwrap();
    }
    let err = h.s.emit(h.now, "/app/e", &raw("3")).unwrap_err();
    assert!(matches!(err, SessionError::QueueFull(_)), "{err:?}");
    assert_eq!(err.code(), code::OVERLOADED);
    assert!(err.to_string().contains("queue_max_events"));
    let big = format!("\"{}\"", "x".repeat(2000));
    let mut h = Harness::new(cfg(&["ws://a.test/"]));
    assert!(matches!(
        h.s.emit(h.now, "/app/e", &raw(&big)),
        Err(SessionError::QueueFull(_))
    ));
}

#[test]
fn bad_paths_are_refused_locally() {
    let mut h = Harness::open();
    for (i, p) in ["", "@@@", "/qio/ping", "/qio"].iter().enumerate() {
        assert!(
            matches!(h.s.emit(h.now, p, &raw("1")), Err(SessionError::BadPath(_))),
            "{p}"
        );
        h.s.request(h.now, p, &raw("1"), i as u32);
        h.s.want(p, None, 100 + i as u64);
    }
    let outs = h.drain();
    assert!(sent(&outs).is_empty());
    assert!(replies(&outs).iter().all(|(_, c)| *c == code::BAD_REQUEST));
    assert_eq!(replies(&outs).len(), 4);
    let refused = subs(&outs);
    assert!(refused.iter().all(|(_, _, c)| *c == code::BAD_REQUEST));
    assert_eq!(refused.len(), 4);
}

#[test]
fn a_wanted_path_is_asked_once_and_each_newer_generation_is_told() {
    let mut h = Harness::open();
    h.s.want("/news", None, 1);
    assert_eq!(sent(&h.drain()), ["/qio/on:1=\"/news\""]);
    // A newer generation while the ask is out moves it there; no second on.
    h.s.want("//news/", None, 2);
    assert!(h.drain().is_empty());
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":\"hi\"}");
    let outs = h.drain();
    assert_eq!(
        subs(&outs),
        [("/news", 2, 200)],
        "answered for the current one"
    );
    // Already active: a newer want is confirmed at once, an older one is stale.
    h.s.want("/news", None, 3);
    assert_eq!(subs(&h.drain()), [("/news", 3, 200)]);
    h.s.want("/news", None, 1);
    assert!(h.drain().is_empty(), "a stale want changes nothing");
    assert_eq!(h.s.status(h.now).subscriptions[0].state, "active");
    // Only the current generation's unwant switches it off.
    h.s.unwant("/news", 2);
    assert!(h.drain().is_empty(), "a stale unwant changes nothing");
    h.s.unwant("/news", 3);
    assert_eq!(sent(&h.drain()), ["/qio/off:0=\"/news\""]);
    assert!(h.s.status(h.now).subscriptions.is_empty());
    h.s.unwant("/news", 3);
    assert!(h.drain().is_empty(), "nothing left to switch off");
}

#[test]
fn unwant_then_want_asks_again_and_ignores_the_old_answer() {
    let mut h = Harness::open();
    h.s.want("/p", None, 1);
    h.s.unwant("/p", 1);
    h.s.want("/p", None, 2);
    assert_eq!(
        sent(&h.drain()),
        ["/qio/on:1=\"/p\"", "/qio/off:0=\"/p\"", "/qio/on:2=\"/p\""]
    );
    // The first on's answer is about a subscription the off ended.
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}");
    assert!(h.drain().is_empty());
    h.frame("/qio/callback/2:0={\"code\":401,\"data\":null,\"err_msg\":\"no\"}");
    assert_eq!(subs(&h.drain()), [("/p", 2, 401)]);
    assert!(
        h.s.status(h.now).subscriptions.is_empty(),
        "refused: not wanted"
    );
}

#[test]
fn subscription_data_is_sent_with_the_path() {
    let mut h = Harness::open();
    h.s.want("/clienttest/on-data", Some(&raw("123987")), 1);
    assert_eq!(
        sent(&h.drain()),
        ["/qio/on:1=[\"/clienttest/on-data\",123987]"]
    );
}

#[test]
fn a_refusal_is_answered_once_and_purges_the_path() {
    for code in [401, 404, 420, 500] {
        let mut h = Harness::open();
        h.s.want("/secret", None, 1);
        h.drain();
        h.frame(&format!(
            "/qio/callback/1:0={{\"code\":{code},\"data\":null,\"err_msg\":\"no\"}}"
        ));
        assert_eq!(subs(&h.drain()), [("/secret", 1, code)]);
        assert!(h.s.status(h.now).subscriptions.is_empty());
        h.s.unwant("/secret", 1);
        assert!(h.drain().is_empty(), "refused: nothing to switch off");
        h.s.want("/secret", None, 2);
        assert_eq!(sent(&h.drain()), ["/qio/on:2=\"/secret\""], "asks again");
    }
}

#[test]
fn pending_202_waits_for_the_final_answer() {
    // on, off, on, then approval of the first on: the in-progress conformance event.
    let mut h = Harness::open();
    h.s.want("/clienttest/in-progress", None, 1);
    h.s.unwant("/clienttest/in-progress", 1);
    h.s.want("/clienttest/in-progress", None, 2);
    assert_eq!(
        sent(&h.drain()),
        [
            "/qio/on:1=\"/clienttest/in-progress\"",
            "/qio/off:0=\"/clienttest/in-progress\"",
            "/qio/on:2=\"/clienttest/in-progress\""
        ]
    );
    h.frame("/qio/callback/2:0={\"code\":202,\"data\":null,\"err_msg\":\"subscription pending\"}");
    assert!(subs(&h.drain()).is_empty(), "202 is not final");
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}");
    assert_eq!(subs(&h.drain()), [("/clienttest/in-progress", 2, 200)]);
    assert_eq!(h.s.status(h.now).subscriptions[0].state, "active");
}

#[test]
fn a_late_confirmation_of_an_abandoned_subscription_is_given_back() {
    let mut h = Harness::open();
    h.s.want("/slow", None, 1);
    h.drain();
    // Every waiter gave up (the hub timed them out).
    h.s.unwant("/slow", 1);
    assert_eq!(sent(&h.drain()), ["/qio/off:0=\"/slow\""]);
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}");
    let outs = h.drain();
    assert_eq!(sent(&outs), ["/qio/off:0=\"/slow\""]);
    assert!(subs(&outs).is_empty(), "nobody to tell");
}

#[test]
fn wants_are_bounded_and_refused_in_the_stream() {
    let mut c = cfg(&["ws://a.test/"]);
    c.max_subscriptions = 2;
    let mut h = Harness::new(c);
    h.handshake();
    h.s.want("/a", None, 1);
    h.s.want("/b", None, 2);
    h.s.want("/c", None, 3);
    h.s.want("/qio/x", None, 4);
    let outs = h.drain();
    assert_eq!(sent(&outs).len(), 2);
    assert_eq!(
        subs(&outs),
        [
            ("/c", 3, code::OVERLOADED),
            ("/qio/x", 4, code::BAD_REQUEST)
        ]
    );
    // Switched off and on while their answers are due: the asks stay bounded too.
    h.s.unwant("/a", 1);
    h.s.unwant("/b", 2);
    h.s.want("/a", None, 5);
    let outs = h.drain();
    assert_eq!(
        subs(&outs),
        [("/a", 5, code::OVERLOADED)],
        "{:?}",
        sent(&outs)
    );
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}");
    h.drain();
    h.s.want("/a", None, 6);
    assert_eq!(sent(&h.drain()), ["/qio/on:3=\"/a\""]);
}

#[test]
fn events_reach_only_subscribed_paths() {
    let mut h = Harness::open();
    h.s.want("/news", None, 1);
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}");
    h.drain();
    h.frame("/other:0=1");
    h.frame("/news:0={\"a\":1}");
    h.frame("/news:9=2");
    let outs = h.drain();
    let evs: Vec<_> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Event(e) => Some((e.path.as_str(), e.data.get(), e.cb)),
            _ => None,
        })
        .collect();
    assert_eq!(
        evs,
        [
            ("/news", "{\"a\":1}", None),
            ("/news", "2", Some(CbHandle { conn: 1, id: 9 }))
        ]
    );
    assert_eq!(h.s.status(h.now).events_in, 2);
}

#[test]
fn heartbeat_watch_pings_after_silence_and_reconnects_without_answer() {
    let mut h = Harness::open();
    h.at(Duration::from_secs(30));
    h.frame("/qio/heartbeat:0=null");
    h.at(Duration::from_secs(65));
    assert!(h.drain().is_empty(), "a frame re-armed the timer");
    h.at(Duration::from_secs(95));
    assert_eq!(sent(&h.drain()), ["/qio/ping:1=null"]);
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}");
    h.at(Duration::from_secs(106));
    assert!(h.drain().is_empty(), "the answer re-armed the timer");
    h.at(Duration::from_secs(160));
    assert_eq!(sent(&h.drain()), ["/qio/ping:2=null"]);
    h.at(Duration::from_secs(169));
    assert!(h.drain().is_empty());
    h.at(Duration::from_secs(170));
    assert_eq!(kinds(&h.drain()), ["close", "closed", "reconnecting"]);
    assert!(!h.s.is_open());
}

#[test]
fn heartbeat_challenges_are_answered() {
    let mut h = Harness::open();
    h.frame("/qio/heartbeat:42=null");
    assert_eq!(sent(&h.drain()), ["/qio/callback/42:0=null"]);
}

#[test]
fn server_requests_are_answered_and_stale_handles_fail() {
    let mut h = Harness::open();
    let handle = CbHandle { conn: 1, id: 4 };
    h.s.answer(h.now, handle, &raw("\"hi\""), None).unwrap();
    h.s.answer(h.now, handle, &raw("2"), Some(5)).unwrap();
    assert_eq!(
        sent(&h.drain()),
        ["/qio/callback/4:0=\"hi\"", "/qio/callback/4:1=2"]
    );
    h.s.handle_closed(h.now, "gone");
    h.at(Duration::from_secs(1));
    h.handshake();
    assert_eq!(
        h.s.answer(h.now, handle, &raw("1"), None),
        Err(SessionError::Disconnected)
    );
    h.s.answer(h.now, handle, &raw("1"), Some(6)).unwrap();
    assert_eq!(replies(&h.drain()), [(6, code::DISCONNECTED)]);
    assert_eq!("1.4".parse::<CbHandle>(), Ok(handle));
    assert_eq!(handle.to_string(), "1.4");
    assert!("14".parse::<CbHandle>().is_err());
}

#[test]
fn an_invalid_frame_closes_and_reconnects() {
    let mut h = Harness::open();
    h.frame("unicorns, ponies, princesses, and magic!:good times");
    let outs = h.drain();
    assert_eq!(kinds(&outs), ["close", "closed", "reconnecting"]);
    match states(&outs)[0] {
        StateChange::Closed { reason } => assert!(reason.contains("invalid frame"), "{reason}"),
        other => panic!("{other:?}"),
    }
    h.at(Duration::from_millis(100));
    assert_eq!(kinds(&h.drain()), ["connecting", "connect"]);
}

#[test]
fn subscriptions_survive_reconnects_and_refusals_on_restore_are_reported() {
    let mut h = Harness::open();
    h.s.want("/a", None, 1);
    h.s.want("/b", None, 2);
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}");
    h.frame("/qio/callback/2:0={\"code\":200,\"data\":null}");
    h.drain();
    h.s.handle_closed(h.now, "gone");
    assert!(h
        .s
        .status(h.now)
        .subscriptions
        .iter()
        .all(|s| s.state == "offline"));
    h.at(Duration::from_secs(1));
    h.drain();
    let outs = h.handshake();
    assert_eq!(
        sent(&outs),
        ["/qio/on:1=\"/a\"", "/qio/on:2=\"/b\""],
        "pipelined"
    );
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}");
    h.frame("/qio/callback/2:0={\"code\":401,\"data\":null,\"err_msg\":\"no\"}");
    let outs = h.drain();
    // Restored: told for the generation it was wanted for, in stream order.
    assert_eq!(subs(&outs), [("/a", 1, 200), ("/b", 2, 401)]);
    let paths: Vec<_> =
        h.s.status(h.now)
            .subscriptions
            .into_iter()
            .map(|s| s.path)
            .collect();
    assert_eq!(paths, ["/a"]);
}

#[test]
fn backoff_grows_while_failing_and_resets_after_a_stable_connection() {
    let mut h = Harness::new(cfg(&["ws://a.test/"]));
    h.drain();
    let mut delays = Vec::new();
    let mut t = T0;
    for _ in 0..10 {
        h.s.handle_connect_failed(h.now, "refused");
        let outs = h.drain();
        let after = states(&outs)
            .into_iter()
            .find_map(|s| match s {
                StateChange::Reconnecting { after } => Some(*after),
                _ => None,
            })
            .unwrap();
        delays.push(after);
        t += after;
        h.at(t);
        assert_eq!(kinds(&h.drain()), ["connecting", "connect"]);
    }
    let caps = [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 25600];
    for (d, cap) in delays.iter().zip(caps) {
        let cap = Duration::from_millis(cap);
        assert!(*d <= cap && *d >= cap.mul_f64(0.75), "{d:?} vs {cap:?}");
    }
    // A handshake alone does not reset it: the connection must last stable_after.
    h.handshake();
    h.at(t + Duration::from_secs(9));
    h.s.handle_closed(h.now, "gone");
    let after = delay(&h.drain()).unwrap();
    assert!(
        after >= Duration::from_millis(19_200),
        "not reset: {after:?}"
    );
    t += Duration::from_secs(9) + after;
    h.at(t);
    h.drain();
    h.handshake();
    h.at(t + Duration::from_secs(10));
    h.s.handle_closed(h.now, "gone");
    let after = delay(&h.drain()).unwrap();
    assert!(after <= Duration::from_millis(100), "reset: {after:?}");
}

#[test]
fn several_servers_are_all_tried() {
    let mut h = Harness::new(cfg(&["ws://a.test/", "ws://b.test/", "ws://c.test/"]));
    let mut seen = Vec::new();
    let mut t = T0;
    for _ in 0..3 {
        let outs = h.drain();
        for o in &outs {
            if let Output::Connect { url: u, .. } = o {
                seen.push(u.host_str().unwrap().to_owned());
            }
        }
        h.s.handle_connect_failed(h.now, "refused");
        t += Duration::from_secs(30);
        h.at(t);
    }
    seen.sort();
    assert_eq!(seen, ["a.test", "b.test", "c.test"]);
}

#[test]
fn a_move_reconnects_at_once_and_falls_back_when_the_target_fails() {
    let mut h = Harness::open();
    h.s.want("/a", None, 1);
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}");
    h.s.request(h.now, "/x", &raw("1"), 2);
    h.drain();
    h.frame("/qio/move:0=\"ws://b.test:81/\"");
    let outs = h.drain();
    assert_eq!(
        kinds(&outs),
        ["moved", "close", "reply", "closed", "connecting", "connect"]
    );
    assert_eq!(replies(&outs), [(2, code::DISCONNECTED)]);
    assert!(
        matches!(outs.last(), Some(Output::Connect { url: u, .. }) if u.as_str() == "ws://b.test:81/")
    );
    let outs = h.handshake();
    assert_eq!(
        sent(&outs),
        ["/qio/on:1=\"/a\""],
        "subscriptions follow the move"
    );
    // A later loss goes back to the moved-to server...
    h.s.handle_closed(h.now, "gone");
    h.at(Duration::from_secs(1));
    let outs = h.drain();
    assert!(
        matches!(outs.last(), Some(Output::Connect { url: u, .. }) if u.as_str() == "ws://b.test:81/")
    );
    // ...until it cannot be reached: then the configured one again.
    h.s.handle_connect_failed(h.now, "refused");
    h.at(Duration::from_secs(2));
    let outs = h.drain();
    assert!(
        matches!(outs.last(), Some(Output::Connect { url: u, .. }) if u.as_str() == "ws://a.test/")
    );
}

#[test]
fn an_invalid_move_is_ignored() {
    let mut h = Harness::open();
    h.frame("/qio/move:0=\"ftp://nowhere/\"");
    h.frame("/qio/move:0=42");
    assert!(h.drain().is_empty());
    assert!(h.s.is_open());
}

#[test]
fn callbacks_for_unknown_ids_are_dropped() {
    let mut h = Harness::open();
    h.frame("/qio/callback/999:0={\"code\":200,\"data\":null}");
    h.frame("/qio/callback/abc:0=null");
    assert!(h.drain().is_empty());
    assert!(h.s.is_open());
}

#[test]
fn pending_callbacks_are_bounded() {
    let mut c = cfg(&["ws://a.test/"]);
    c.max_pending_callbacks = 2;
    let mut h = Harness::new(c);
    h.drain();
    h.handshake();
    for i in 0..3 {
        h.s.request(h.now, "/x", &raw("1"), i);
    }
    assert_eq!(replies(&h.drain()), [(2, code::OVERLOADED)]);
}

#[test]
fn shutdown_answers_everyone_and_refuses_more() {
    let mut h = Harness::open();
    h.s.request(h.now, "/x", &raw("1"), 1);
    h.s.want("/pending", None, 2);
    h.drain();
    h.s.shutdown();
    let outs = h.drain();
    // Waiting subscriptions are the hub's to answer when it hears of the stop.
    assert_eq!(replies(&outs), [(1, code::DISCONNECTED)]);
    assert_eq!(states(&outs), [&StateChange::Stopped]);
    assert_eq!(h.s.emit(h.now, "/x", &raw("1")), Err(SessionError::Stopped));
    h.s.want("/y", None, 3);
    assert_eq!(subs(&h.drain()), [("/y", 3, code::DISCONNECTED)]);
    assert_eq!(h.s.poll_timeout(), None);
}

#[test]
fn changing_the_servers_reconnects_only_when_the_current_one_went_away() {
    let mut h = Harness::open();
    h.s.set_servers(
        h.now,
        vec![
            Url::parse("ws://a.test/").unwrap(),
            Url::parse("ws://z.test/").unwrap(),
        ],
    );
    assert!(h.drain().is_empty(), "current server still configured");
    h.s.request(h.now, "/x", &raw("1"), 1);
    h.drain();
    h.s.set_servers(h.now, vec![Url::parse("ws://b.test/").unwrap()]);
    let outs = h.drain();
    assert_eq!(
        kinds(&outs),
        ["close", "reply", "closed", "connecting", "connect"]
    );
    assert!(
        matches!(outs.last(), Some(Output::Connect { url: u, .. }) if u.as_str() == "ws://b.test/")
    );
}

fn cfg_v01() -> SessionConfig {
    let mut c = cfg(&["ws://old.test/qio"]);
    c.dialect = DialectChoice::Fixed(Dialect::V01);
    c.queue_max_bytes = 100_000;
    c
}

fn connect_transport(outs: &[Output<u32>]) -> Option<Transport> {
    outs.iter().find_map(|o| match o {
        Output::Connect { transport, .. } => Some(*transport),
        _ => None,
    })
}

/// How a WebSocket attempt that reached the server can fail before `/qio/ohai`.
#[derive(Debug, Clone, Copy)]
enum Broken {
    /// The upgrade itself failed (a mangled 101, EOF or reset during it).
    Upgrade,
    /// The upgrade hung until the handshake deadline.
    UpgradeHung,
    /// Upgraded, then closed or reset.
    Closed,
    /// Upgraded, then a frame other than `/qio/ohai`.
    NotOhai,
    /// Upgraded, then silence until the handshake deadline.
    Silent,
}

impl Broken {
    const ALL: [Broken; 5] = [
        Broken::Upgrade,
        Broken::UpgradeHung,
        Broken::Closed,
        Broken::NotOhai,
        Broken::Silent,
    ];

    fn apply(self, h: &mut Harness) {
        h.s.handle_reached();
        match self {
            Broken::Upgrade => {
                h.s.handle_upgrade_failed(h.now, "HTTP error: 200 OK", false)
            }
            Broken::UpgradeHung | Broken::Silent => {
                if let Broken::Silent = self {
                    h.s.handle_connected(h.now);
                }
                let deadline = h.s.poll_timeout().expect("a handshake deadline");
                h.now = deadline;
                h.s.handle_timeout(h.now);
            }
            Broken::Closed => {
                h.s.handle_connected(h.now);
                h.s.handle_closed(h.now, "connection reset");
            }
            Broken::NotOhai => {
                h.s.handle_connected(h.now);
                h.frame("/qio/heartbeat:0=null");
            }
        }
    }
}

#[test]
fn a_websocket_that_reached_the_server_but_gave_no_ohai_falls_back_to_long_polling_at_once() {
    for broken in Broken::ALL {
        let mut h = Harness::new(cfg(&["ws://a.test/"]));
        assert_eq!(connect_transport(&h.drain()), Some(Transport::WebSocket));
        broken.apply(&mut h);
        let outs = h.drain();
        let next = outs.iter().find_map(|o| match o {
            Output::Connect {
                url,
                dialect,
                transport,
            } => Some((url.as_str(), *dialect, *transport)),
            _ => None,
        });
        assert_eq!(
            next,
            Some(("ws://a.test/", Dialect::V02, Transport::LongPoll)),
            "{broken:?}: {:?}",
            kinds(&outs)
        );
        assert!(
            !kinds(&outs).contains(&"failed") && !kinds(&outs).contains(&"reconnecting"),
            "{broken:?}: at once, no failure: {:?}",
            kinds(&outs)
        );
        h.handshake();
        assert!(h.s.is_open(), "{broken:?}");
        let st = h.s.status(h.now);
        assert_eq!(st.transport, Some("long-poll"), "{broken:?}");
        assert!(
            st.upgrade_error.is_some(),
            "{broken:?}: the reason is shown"
        );
        // The next reconnect tries WebSocket first again, and one that opens clears the
        // reason.
        h.s.handle_closed(h.now, "dropped");
        h.reconnect();
        h.handshake();
        let st = h.s.status(h.now);
        assert_eq!(
            (st.transport, st.upgrade_error),
            (Some("websocket"), None),
            "{broken:?}"
        );
    }
}

#[test]
fn no_fallback_without_reaching_the_server_or_when_the_settings_forbid_it() {
    // Network trouble: the connect timed out before the server answered it.
    let mut h = Harness::new(cfg(&["ws://a.test/"]));
    h.drain();
    h.at(Duration::from_secs(10));
    assert_eq!(kinds(&h.drain()), ["close", "failed", "reconnecting"]);
    // transport = "websocket", and the 0.1 dialect (which has no long polling).
    for (transport, dialect) in [
        (TransportChoice::WebSocket, Dialect::V02),
        (TransportChoice::Auto, Dialect::V01),
    ] {
        for broken in Broken::ALL {
            let mut c = cfg(&["ws://a.test/qio"]);
            c.transport = transport;
            c.dialect = DialectChoice::Fixed(dialect);
            let mut h = Harness::new(c);
            h.drain();
            broken.apply(&mut h);
            let outs = h.drain();
            if dialect == Dialect::V01 && !matches!(broken, Broken::Upgrade | Broken::UpgradeHung) {
                // 0.1 is open at once after its upgrade: nothing to fail before ohai.
                continue;
            }
            assert!(
                kinds(&outs).contains(&"failed") && connect_transport(&outs).is_none(),
                "{transport:?} {dialect:?} {broken:?}: {:?}",
                kinds(&outs)
            );
        }
    }
}

#[test]
fn a_failed_fallback_says_both_reasons_and_backs_off() {
    let mut c = cfg(&["ws://a.test/"]);
    c.dialect = DialectChoice::Fixed(Dialect::V02);
    let mut h = Harness::new(c);
    h.drain();
    Broken::NotOhai.apply(&mut h);
    h.drain();
    h.s.handle_connect_failed(h.now, "501 Not Implemented");
    assert_eq!(kinds(&h.drain()), ["failed", "reconnecting"]);
    let err = h.s.status(h.now).last_error.unwrap();
    assert!(
        err.contains("instead of /qio/ohai") && err.contains("and so did long polling: 501"),
        "{err}"
    );
    h.reconnect();
}

fn connect_dialect(outs: &[Output<u32>]) -> Option<Dialect> {
    outs.iter().find_map(|o| match o {
        Output::Connect { dialect, .. } => Some(*dialect),
        _ => None,
    })
}

#[test]
fn dialect_01_opens_without_ohai_and_maps_callbacks() {
    let mut h = Harness::new(cfg_v01());
    assert_eq!(connect_dialect(&h.drain()), Some(Dialect::V01));
    h.s.want("/news", None, 1);
    h.s.handle_connected(h.now);
    let outs = h.drain();
    assert_eq!(kinds(&outs), ["send", "open"], "no ohai: open at once");
    assert_eq!(sent(&outs), ["/qio/sub:1:plain=/news"]);
    h.frame("/qio/callback/1:0:plain=");
    assert_eq!(subs(&h.drain()), [("/news", 1, 200)]);
    h.s.request(h.now, "/app/x", &raw("\"text\""), 2);
    h.s.request(h.now, "/app/y", &raw("{\"a\":1}"), 3);
    assert_eq!(
        sent(&h.drain()),
        ["/app/x:2:plain=text", "/app/y:3:json={\"a\":1}"]
    );
    h.frame("/qio/callback/2:0:plain=back");
    h.frame("/qio/callback/3:0:plain=qio_error");
    let outs = h.drain();
    let got: Vec<_> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Reply(t, o) => Some((*t, o.code, o.data.get().to_owned(), o.err_msg.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        got,
        [
            (2, 200, "\"back\"".to_owned(), None),
            (3, 500, "null".to_owned(), Some("qio_error".to_owned()))
        ]
    );
    h.frame("/news:0:json=[1]");
    h.frame("/qio/heartbeat:0:plain=");
    assert_eq!(kinds(&h.drain()), ["event"]);
    h.s.unwant("/news", 1);
    assert_eq!(sent(&h.drain()), ["/qio/unsub:0:plain=/news"]);
    assert_eq!(h.s.status(h.now).dialect, "0.1");
}

#[test]
fn dialect_01_refuses_oversized_frames_and_subscription_data() {
    let mut h = Harness::new(cfg_v01());
    h.drain();
    h.s.handle_connected(h.now);
    h.drain();
    let big = format!("\"{}\"", "x".repeat(1100));
    let err = h.s.emit(h.now, "/a", &raw(&big)).unwrap_err();
    assert!(
        matches!(err, SessionError::TooLarge { max: 1024, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("max_frame_bytes"));
    h.s.request(h.now, "/a", &raw(&big), 1);
    h.s.want("/d", Some(&raw("123987")), 2);
    let outs = h.drain();
    assert_eq!(replies(&outs), [(1, code::BAD_REQUEST)]);
    assert_eq!(subs(&outs), [("/d", 2, code::BAD_REQUEST)]);
    assert!(
        sent(&outs).is_empty(),
        "nothing oversized reaches the server"
    );
    // Just under the limit goes.
    let fits = format!("\"{}\"", "x".repeat(1024 - "/a:0:plain=".len()));
    h.s.emit(h.now, "/a", &raw(&fits)).unwrap();
    assert_eq!(sent(&h.drain())[0].len(), 1024);
}

#[test]
fn auto_detection_falls_back_to_01_at_once_and_remembers_it() {
    let mut h = Harness::new(cfg(&["ws://old.test/qio"]));
    assert_eq!(connect_dialect(&h.drain()), Some(Dialect::V02));
    h.s.handle_upgrade_failed(h.now, "server sent no subprotocol", true);
    let outs = h.drain();
    assert_eq!(
        kinds(&outs),
        ["connecting", "connect"],
        "no backoff, no failure reported"
    );
    assert_eq!(connect_dialect(&outs), Some(Dialect::V01));
    h.s.handle_connected(h.now);
    assert_eq!(kinds(&h.drain()), ["open"]);
    // Remembered for this address: the next reconnect speaks 0.1 straight away.
    h.s.handle_closed(h.now, "dropped");
    h.at(Duration::from_secs(1));
    assert_eq!(connect_dialect(&h.drain()), Some(Dialect::V01));
}

#[test]
fn auto_detection_also_falls_back_when_the_handshake_is_dropped() {
    let mut h = Harness::new(cfg(&["ws://old.test/qio"]));
    h.drain();
    h.s.handle_connected(h.now);
    h.drain();
    h.s.handle_closed(h.now, "connection reset");
    // Long polling first (the upgrade did succeed); 0.1 has none, so that fails too.
    assert_eq!(connect_transport(&h.drain()), Some(Transport::LongPoll));
    h.s.handle_connect_failed(h.now, "no long polling here");
    assert_eq!(connect_dialect(&h.drain()), Some(Dialect::V01));
    // A 0.1 attempt that fails too is an ordinary failure, and the next try is 0.2 again.
    h.s.handle_connect_failed(h.now, "refused");
    let outs = h.drain();
    assert_eq!(kinds(&outs), ["failed", "reconnecting"]);
    h.at(Duration::from_secs(1));
    assert_eq!(connect_dialect(&h.drain()), Some(Dialect::V02));
}

#[test]
fn a_fixed_02_dialect_never_falls_back() {
    let mut c = cfg(&["ws://a.test/"]);
    c.dialect = DialectChoice::Fixed(Dialect::V02);
    c.transport = TransportChoice::WebSocket;
    let mut h = Harness::new(c);
    h.drain();
    h.s.handle_upgrade_failed(h.now, "server sent no subprotocol", true);
    assert_eq!(kinds(&h.drain()), ["failed", "reconnecting"]);
}

#[test]
fn a_01_failure_without_qio_in_the_path_says_so() {
    let mut c = cfg(&["ws://old.test:81/"]);
    c.dialect = DialectChoice::Fixed(Dialect::V01);
    let mut h = Harness::new(c);
    h.drain();
    h.s.handle_connect_failed(h.now, "connection reset");
    assert!(h
        .s
        .status(h.now)
        .last_error
        .unwrap()
        .contains("needs /qio in the address"));
}

#[test]
fn a_move_loop_is_slowed_down_by_the_backoff() {
    let mut h = Harness::open();
    let mut immediate = 0;
    let mut delays = Vec::new();
    for i in 0..8 {
        let to = if i % 2 == 0 {
            "ws://b.test/"
        } else {
            "ws://a.test/"
        };
        h.frame(&format!("/qio/move:0=\"{to}\""));
        let outs = h.drain();
        match states(&outs).last() {
            Some(StateChange::Connecting { .. }) => immediate += 1,
            Some(StateChange::Reconnecting { after }) => {
                delays.push(*after);
                h.at(h.now - h.t0 + *after);
                h.drain();
            }
            other => panic!("{other:?}"),
        }
        h.handshake();
    }
    assert_eq!(immediate, 2, "the first moves are followed at once");
    assert!(
        delays.len() == 6 && delays.windows(2).all(|w| w[1] >= w[0].mul_f64(1.5)),
        "{delays:?}"
    );
    // A server that keeps us for stable_after is trusted again.
    let later = h.now - h.t0 + Duration::from_secs(10);
    h.at(later);
    h.frame("/qio/move:0=\"ws://c.test/\"");
    assert!(matches!(
        states(&h.drain()).last(),
        Some(StateChange::Connecting { .. })
    ));
}

fn at_least_once() -> Harness {
    let mut c = cfg(&["ws://a.test/"]);
    c.fire_and_forget = FireAndForget::AtLeastOnce;
    let mut h = Harness::new(c);
    h.drain();
    h.handshake();
    h
}

#[test]
fn fire_and_forget_events_are_sent_again_unless_the_server_was_seen_to_read_them() {
    let mut h = at_least_once();
    h.s.emit(h.now, "/e", &raw("1")).unwrap();
    h.s.emit(h.now, "/e", &raw("2")).unwrap();
    assert_eq!(sent(&h.drain()), ["/e:0=1", "/e:0=2"]);
    // Soon after, a ping asks for proof; its answer confirms both.
    h.at(Duration::from_millis(100));
    assert_eq!(sent(&h.drain()), ["/qio/ping:1=null"]);
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}");
    h.s.emit(h.now, "/e", &raw("3")).unwrap();
    h.drain();
    // The connection dies before 3 was confirmed: it goes first after the reconnect.
    h.s.handle_closed(h.now, "reset");
    h.s.emit(h.now, "/e", &raw("4")).unwrap();
    h.at(Duration::from_secs(5));
    h.drain();
    assert_eq!(sent(&h.handshake()), ["/e:0=3", "/e:0=4"]);
}

#[test]
fn unconfirmed_events_are_bounded_and_refused_not_dropped() {
    let mut h = at_least_once();
    for i in 0..3 {
        h.s.emit(h.now, "/e", &raw(&i.to_string())).unwrap();
    }
    let outs = h.drain();
    assert_eq!(sent(&outs).len(), 3);
    // Half full at the second: a proof ping is due at once.
    assert_eq!(h.s.poll_timeout(), Some(h.now));
    let err = h.s.emit(h.now, "/e", &raw("3")).unwrap_err();
    assert!(err.to_string().contains("not yet confirmed"), "{err}");
    h.at(T0);
    assert_eq!(sent(&h.drain()), ["/qio/ping:1=null"]);
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}");
    h.s.emit(h.now, "/e", &raw("3")).unwrap();
}

#[test]
fn regression_issue13_at_least_once_never_drops_what_was_sent_again() {
    let mut h = at_least_once();
    h.s.emit_from(h.now, "/e", &raw("1"), Some(4)).unwrap();
    h.drain();
    // Every kind of break, the server's own close and a move included: the event goes
    // again each time until a callback proves the server read it.
    for round in 0..4 {
        match round {
            0 => h.s.handle_closed(h.now, "reset"),
            1 => {
                h.s.handle_closed(h.now, "server closed the connection (1005)")
            }
            2 => h.frame("/qio/move:0=\"ws://a.test/\""),
            _ => h.frame("not a frame"),
        }
        h.reconnect();
        assert_eq!(sent(&h.handshake()), ["/e:0=1"], "round {round}");
    }
    assert_eq!(h.s.status(h.now).events_dropped, 0);
    h.at(h.now - h.t0 + Duration::from_secs(1));
    assert_eq!(sent(&h.drain()), ["/qio/ping:1=null"]);
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}");
    h.s.handle_closed(h.now, "reset");
    h.at(h.now - h.t0 + Duration::from_secs(30));
    h.drain();
    assert!(sent(&h.handshake()).is_empty(), "confirmed: not sent again");
}

/// The delay the session chose in these outputs, if it chose one.
fn delay(outs: &[Output<u32>]) -> Option<Duration> {
    states(outs).into_iter().find_map(|s| match s {
        StateChange::Reconnecting { after } => Some(*after),
        _ => None,
    })
}

#[test]
fn regression_bug4_backoff_resets_again_after_a_move_loop() {
    // A move loop first: the servers move us on as soon as we arrive.
    let mut h = Harness::open();
    for i in 0..6 {
        let to = if i % 2 == 0 {
            "ws://b.test/"
        } else {
            "ws://a.test/"
        };
        h.frame(&format!("/qio/move:0=\"{to}\""));
        if let Some(after) = delay(&h.drain()) {
            h.at(h.now - h.t0 + after);
            h.drain();
        }
        h.handshake();
    }
    // Then ordinary life: connections that stay up 30 s and break. Each reconnect waits
    // about the initial delay, as after any good connection.
    for round in 0..5 {
        let later = h.now - h.t0 + Duration::from_secs(30);
        h.at(later);
        h.drain();
        h.s.handle_closed(h.now, "reset by peer");
        let after = delay(&h.drain()).expect("a reconnect delay");
        assert!(
            after <= Duration::from_millis(100),
            "round {round}: {after:?} after a 30 s connection"
        );
        h.at(h.now - h.t0 + after);
        h.drain();
        h.handshake();
    }
}

/// Simulates `minutes` of a server that answers the handshake and then drops the
/// connection after `open_for`; returns the connection attempts in each minute.
fn attempts_per_minute(open_for: Duration, minutes: u64) -> Vec<u32> {
    let mut h = Harness::new(cfg(&["ws://flaky.test/"]));
    let mut per_minute = vec![0u32; minutes as usize];
    let end = Duration::from_secs(60 * minutes);
    loop {
        let outs = h.drain();
        if outs.iter().any(|o| matches!(o, Output::Connect { .. })) {
            let minute = ((h.now - h.t0).as_secs() / 60) as usize;
            per_minute[minute] += 1;
            h.handshake();
            h.at(h.now - h.t0 + open_for);
            h.drain();
            h.s.handle_closed(h.now, "connection reset without closing handshake");
            continue;
        }
        let Some(next) = h.s.poll_timeout() else {
            panic!("the session stopped trying: {:?}", kinds(&outs));
        };
        if next - h.t0 >= end {
            return per_minute;
        }
        h.at(next - h.t0);
    }
}

#[test]
fn regression_bug7_a_server_that_greets_and_drops_is_not_hammered() {
    for open_for in [
        Duration::ZERO,
        Duration::from_millis(50),
        Duration::from_secs(2),
    ] {
        let per_minute = attempts_per_minute(open_for, 10);
        // The first minute ramps up the backoff; after it, at most one a second on
        // average (in fact the capped backoff gives a few a minute).
        assert!(
            per_minute[1..].iter().all(|&n| n <= 60),
            "open for {open_for:?}: {per_minute:?}"
        );
        let total: u32 = per_minute.iter().sum();
        assert!(total <= 60 + 9 * 5, "open for {open_for:?}: {per_minute:?}");
    }
}

#[test]
fn regression_issue13_an_event_written_to_an_open_connection_is_never_sent_again() {
    let mut h = Harness::open();
    h.s.emit(h.now, "/clienttest/close", &raw("null")).unwrap();
    assert_eq!(sent(&h.drain()), ["/clienttest/close:0=null"]);
    h.s.handle_closed(h.now, "server closed the connection (1005)");
    h.s.emit(h.now, "/offline", &raw("1")).unwrap();
    let after = delay(&h.drain()).unwrap();
    h.at(after);
    h.drain();
    // Only what was queued while offline goes, once.
    assert_eq!(sent(&h.handshake()), ["/offline:0=1"]);
    h.s.handle_closed(h.now, "reset");
    h.at(Duration::from_secs(5));
    h.drain();
    assert!(sent(&h.handshake()).is_empty(), "nothing is sent twice");
}

#[test]
fn regression_issue13_a_move_from_wss_to_ws_is_refused() {
    let mut h = Harness::new(cfg(&["wss://secure.test/"]));
    h.drain();
    h.handshake();
    h.frame("/qio/move:0=\"ws://plain.test/\"");
    let outs = h.drain();
    let connects: Vec<_> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Connect { url, .. } => Some(url.as_str().to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(connects, ["wss://secure.test/"], "{:?}", kinds(&outs));
    assert!(
        h.s.status(h.now)
            .last_error
            .is_some_and(|e| e.contains("TLS")),
        "{:?}",
        h.s.status(h.now).last_error
    );
}

#[test]
fn regression_bug5_a_queued_event_too_big_for_the_detected_dialect_is_told_to_its_sender() {
    let mut c = cfg(&["ws://old.test/qio"]);
    c.queue_max_bytes = 10_000;
    let mut h = Harness::new(c);
    h.drain();
    // Queued before the first connection, checked against 0.2 (no frame limit).
    let big = format!("\"{}\"", "x".repeat(1100));
    h.s.emit_from(h.now, "/big", &raw(&big), Some(7)).unwrap();
    h.s.emit_from(h.now, "/small", &raw("1"), Some(8)).unwrap();
    // The server turns out to speak 0.1, whose frames stop at 1 KiB.
    h.s.handle_upgrade_failed(h.now, "server sent no subprotocol", true);
    h.drain();
    h.s.handle_connected(h.now);
    let outs = h.drain();
    assert_eq!(sent(&outs), ["/small:0:json=1"]);
    let dropped: Vec<_> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Dropped {
                sender,
                path,
                outcome,
            } => Some((
                *sender,
                path.as_str(),
                outcome.code,
                outcome.err_msg.clone(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(dropped.len(), 1, "{:?}", kinds(&outs));
    let (sender, path, code, msg) = &dropped[0];
    assert_eq!((*sender, *path, *code), (7, "/big", code::BAD_REQUEST));
    let msg = msg.as_deref().unwrap_or_default();
    assert!(
        msg.contains("0.1") && msg.contains("max_frame_bytes"),
        "{msg}"
    );
    assert_eq!(h.s.status(h.now).events_dropped, 1);
}

#[test]
fn by_default_nothing_waits_for_proof_of_reading() {
    let mut h = Harness::open();
    for i in 0..10 {
        h.s.emit(h.now, "/e", &raw(&i.to_string())).unwrap();
    }
    assert_eq!(sent(&h.drain()).len(), 10, "no bound on what was written");
    h.at(Duration::from_secs(1));
    assert!(sent(&h.drain()).is_empty(), "no confirmation ping");
}

#[test]
fn a_move_that_drops_tls_is_followed_when_allowed() {
    let mut c = cfg(&["wss://secure.test/"]);
    c.allow_insecure_move = true;
    let mut h = Harness::new(c);
    h.drain();
    h.handshake();
    h.frame("/qio/move:0=\"ws://plain.test/\"");
    let outs = h.drain();
    assert!(
        matches!(outs.last(), Some(Output::Connect { url, .. }) if url.as_str() == "ws://plain.test/"),
        "{:?}",
        kinds(&outs)
    );
    // wss to wss is always followed.
    let mut h = Harness::new(cfg(&["wss://secure.test/"]));
    h.drain();
    h.handshake();
    h.frame("/qio/move:0=\"other.test:8443\"");
    let outs = h.drain();
    assert!(
        matches!(outs.last(), Some(Output::Connect { url, .. }) if url.as_str() == "wss://other.test:8443/"),
        "{:?}",
        kinds(&outs)
    );
}

#[test]
fn regression_bug7_a_flapping_listener_is_not_hammered() {
    // Every other attempt is refused, the others greet and drop at once.
    let mut h = Harness::new(cfg(&["ws://flap.test/"]));
    let mut per_minute = [0u32; 5];
    let end = Duration::from_secs(300);
    let mut n = 0u32;
    while h.now - h.t0 < end {
        let outs = h.drain();
        if outs.iter().any(|o| matches!(o, Output::Connect { .. })) {
            per_minute[((h.now - h.t0).as_secs() / 60) as usize] += 1;
            n += 1;
            if n.is_multiple_of(2) {
                h.s.handle_connect_failed(h.now, "connection refused");
            } else {
                h.handshake();
                h.s.handle_closed(h.now, "connection closed without a close frame");
            }
            continue;
        }
        let next = h.s.poll_timeout().expect("a retry");
        h.at(next - h.t0);
    }
    assert!(per_minute[1..].iter().all(|&n| n <= 60), "{per_minute:?}");
}

#[test]
fn a_zero_bound_is_refused_when_the_session_is_built() {
    let mut c = cfg(&["ws://a.test/"]);
    c.max_subscriptions = 0;
    let err = Session::<u32>::new(c, 1, Instant::now()).unwrap_err();
    assert_eq!(err, SessionError::ZeroBound("max_subscriptions"));
    assert_eq!(err.to_string(), "max_subscriptions must be at least 1");
}

#[test]
fn one_confirm_ping_at_a_time() {
    let mut h = at_least_once();
    h.s.emit(h.now, "/e", &raw("1")).unwrap();
    h.at(Duration::from_millis(100));
    assert_eq!(sent(&h.drain()), ["/e:0=1", "/qio/ping:1=null"]);
    h.s.emit(h.now, "/e", &raw("2")).unwrap();
    h.at(Duration::from_millis(200));
    assert_eq!(sent(&h.drain()), ["/e:0=2"], "the first ping is still out");
    h.frame("/qio/callback/1:0={\"code\":200,\"data\":null}");
    h.at(Duration::from_millis(300));
    assert_eq!(sent(&h.drain()), ["/qio/ping:2=null"], "then the next one");
}
