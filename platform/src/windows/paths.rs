//! Where the daemon listens on Windows: a named pipe, not a file.

use std::ffi::OsString;
use std::path::PathBuf;

/// `QIOD_SOCKET` when set, else the pipe `\\.\pipe\qiod-<user>` (one daemon per user,
/// as on Unix).
pub fn default_socket_path() -> PathBuf {
    socket_path_from(&|key| std::env::var_os(key))
}

/// [`default_socket_path`] over an explicit environment.
pub fn socket_path_from(env: &dyn Fn(&str) -> Option<OsString>) -> PathBuf {
    let set = |key: &str| env(key).filter(|v| !v.is_empty());
    if let Some(path) = set("QIOD_SOCKET") {
        return PathBuf::from(path);
    }
    let user = set("USERNAME").unwrap_or_else(|| OsString::from("default"));
    let mut name = OsString::from(r"\\.\pipe\qiod-");
    name.push(pipe_safe(&user));
    PathBuf::from(name)
}

/// A pipe name may hold any character but a backslash, and at most 256 of them.
fn pipe_safe(user: &std::ffi::OsStr) -> String {
    user.to_string_lossy()
        .chars()
        .map(|c| if c == '\\' { '_' } else { c })
        .take(200)
        .collect()
}
