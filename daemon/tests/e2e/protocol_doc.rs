//! PROTOCOL.md's dialect tables are the contract: each row is checked against the code.

use qiod::codec::Dialect;
use qiod::session::{DialectChoice, Output, Session, SessionConfig};
use serde_json::value::RawValue;
use serde_json::Value;
use std::time::Instant;

/// The rows of the table after `<!-- table:NAME -->`, cells without their backticks.
fn table(name: &str) -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ipc-proto/PROTOCOL.md"
    ))
    .expect("PROTOCOL.md");
    let start = doc
        .find(&format!("<!-- table:{name} -->"))
        .unwrap_or_else(|| panic!("table {name} in PROTOCOL.md"));
    let body = &doc[start..];
    let body = &body[..body.find("<!-- end -->").expect("end marker")];
    let rows: Vec<(String, String)> = body
        .lines()
        .filter(|l| l.starts_with('|'))
        // The header and the separator.
        .skip(2)
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").collect();
            assert_eq!(cells.len(), 2, "{l}");
            let cell = |c: &str| c.trim().trim_matches('`').to_owned();
            (cell(cells[0]), cell(cells[1]))
        })
        .collect();
    assert!(rows.len() >= 3, "table {name} has rows");
    rows
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn incoming_01_data_maps_as_documented() {
    for (frame, data) in table("v01-in") {
        let f = Dialect::V01
            .decode(&frame)
            .unwrap_or_else(|e| panic!("{frame}: {e}"));
        assert_eq!(json(f.data.get()), json(&data), "{frame}");
    }
}

#[test]
fn outgoing_data_is_framed_as_documented() {
    for (data, frame) in table("v01-out") {
        let raw = RawValue::from_string(data.clone()).unwrap();
        assert_eq!(Dialect::V01.encode("/app", 0, &raw), frame, "{data}");
    }
}

#[test]
fn callbacks_map_to_replies_as_documented() {
    for (frame, reply) in table("v01-callback") {
        let mut cfg = SessionConfig::new(vec!["ws://x/qio".parse().unwrap()]);
        cfg.dialect = DialectChoice::Fixed(Dialect::V01);
        let now = Instant::now();
        let mut s: Session<u8> = Session::new(cfg, 1, now).unwrap();
        s.handle_connected(now);
        s.request(
            now,
            "/app",
            &RawValue::from_string("null".into()).unwrap(),
            7,
        );
        s.handle_frame(now, &frame);
        let outcome = std::iter::from_fn(|| s.poll_output())
            .find_map(|o| match o {
                Output::Reply(7, outcome) => Some(outcome),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{frame} answered the request"));
        let mut got = serde_json::json!({"code": outcome.code, "data": json(outcome.data.get())});
        if let Some(msg) = outcome.err_msg {
            got["err_msg"] = msg.into();
        }
        assert_eq!(got, json(&reply), "{frame}");
    }
}
