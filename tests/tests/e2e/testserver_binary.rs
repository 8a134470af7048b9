//! The `qio-testserver` binary as scripts run it: its log goes to a file or a pipe.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// Kills the server when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_log_written_to_a_file_has_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut server = Running(
        Command::new(env!("CARGO_BIN_EXE_qio-testserver"))
            .args(["--port", "0"])
            .env_remove("NO_COLOR")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("qio-testserver starts"),
    );
    let mut first = String::new();
    BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("listening on ws://"), "{first:?}");
    // The server logs that it listens before it prints the address.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("test server listening"), "{text:?}");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in the log: {text:?}"
    );
}
