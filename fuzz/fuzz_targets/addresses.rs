//! Server addresses, move targets and callback handles: no panic, and what is accepted is
//! usable and stable. Input: `<current address>\n<move target>`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qio_ipc::clean_path;
use qiod::session::{parse_server_url, resolve_move, CbHandle};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (a, b) = text.split_once('\n').unwrap_or((text, ""));
    let once = clean_path(a);
    assert_eq!(clean_path(&once), once, "clean_path is idempotent");
    if let Ok(h) = a.parse::<CbHandle>() {
        assert_eq!(h.to_string().parse::<CbHandle>(), Ok(h));
    }
    let base = parse_server_url(a)
        .unwrap_or_else(|_| url::Url::parse("wss://a.example:8443/qio").expect("url"));
    if let Ok(u) = parse_server_url(a) {
        assert!(matches!(u.scheme(), "ws" | "wss") && u.has_host(), "{u}");
    }
    if let Ok(to) = resolve_move(&base, b) {
        assert!(matches!(to.scheme(), "ws" | "wss") && to.has_host(), "{to}");
        let again = parse_server_url(to.as_str()).expect("a move target is a server address");
        assert_eq!(again, to, "stable");
    }
});
