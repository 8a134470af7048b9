//! Any request line through `qio_ipc::RawRequest::parse`: no panic; a request has what its
//! op needs and raw JSON data; an id (also the one an error keeps) is a JSON number or
//! string that a reply echoes as valid JSON; error messages stay short.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qio_ipc::{ErrorData, Id, Op, RawRequest, ReplyOut};
use serde_json::value::RawValue;

fn check_id(id: &Id) {
    let text = id.as_json();
    assert!(
        matches!(text.as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9')),
        "id {text:?}"
    );
    serde_json::from_str::<&RawValue>(text).expect("the id is JSON");
    let null = RawValue::from_string("null".into()).expect("null");
    let line = serde_json::to_string(&ReplyOut {
        id,
        code: 400,
        data: &null,
        err_msg: Some("x"),
        cb: None,
    })
    .expect("a reply serializes");
    // Through RawValue: an id like 1e400 is valid JSON that serde_json's Value refuses.
    let back: std::collections::HashMap<String, &RawValue> =
        serde_json::from_str(&line).expect("the reply line is a JSON object");
    assert_eq!(back.get("id").map(|r| r.get()), Some(text));
    assert!(line.contains(text), "the id comes back as the same text");
}

fuzz_target!(|data: &[u8]| {
    match RawRequest::parse(data) {
        Ok(r) => {
            if let Some(id) = &r.id {
                check_id(id);
            }
            if let Some(d) = &r.data {
                serde_json::from_str::<&RawValue>(d.get()).expect("data is JSON");
            }
            match r.op {
                Op::Send | Op::On | Op::One | Op::Off => assert!(r.path.is_some()),
                Op::Callback => assert!(r.cb.is_some()),
                Op::Status => {}
            }
        }
        Err(bad) => {
            if let Some(id) = &bad.id {
                check_id(id);
            }
            // Every field is quoted cut short (regression test:
            // tests/tests/e2e/hostile.rs::ipc_errors_about_an_unknown_op_stay_short).
            assert!(bad.message.len() < 1024, "{} bytes", bad.message.len());
            let e = ErrorData {
                op: bad.op.map(|o| o.as_str().to_owned()),
                path: None,
                code: 400,
                err_msg: bad.message,
            };
            serde_json::to_string(&e).expect("an /error serializes");
        }
    }
});
