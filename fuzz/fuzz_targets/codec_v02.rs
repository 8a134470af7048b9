//! Any text frame through the 0.2 decoder: no panic, a well-formed frame or a short error,
//! and a decoded frame re-encodes to itself.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use qiod::codec::Dialect;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Dialect::V02.decode(text) {
        Ok(f) => {
            common::check_frame(&f);
            common::check_round_trip(Dialect::V02, &f.path, f.cb, &f.data);
        }
        Err(e) => common::check_error(&e),
    }
});
