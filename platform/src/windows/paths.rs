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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn one_pipe_per_user_unless_named() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        assert_eq!(
            socket_path_from(&env(&[("USERNAME", "ann")])),
            Path::new(r"\\.\pipe\qiod-ann")
        );
        assert_eq!(
            socket_path_from(&env(&[("USERNAME", r"DOM\ann")])),
            Path::new(r"\\.\pipe\qiod-DOM_ann")
        );
        assert_eq!(
            socket_path_from(&env(&[("USERNAME", "ann"), ("QIOD_SOCKET", r"\\.\pipe\x")])),
            Path::new(r"\\.\pipe\x")
        );
        assert_eq!(
            socket_path_from(&env(&[])),
            Path::new(r"\\.\pipe\qiod-default")
        );
    }
}
