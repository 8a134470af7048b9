//! Where the daemon's socket is, computed the same way by the daemon and by every client.

use std::ffi::OsString;
use std::path::PathBuf;

/// Where the daemon listens unless told otherwise; clients compute the same path.
///
/// `QIOD_SOCKET` wins; then `$XDG_RUNTIME_DIR/qiod/qiod.sock` (a per-user tmpfs that
/// systemd cleans up); then `/run/qiod/qiod.sock` for root; else `/tmp/qiod-<uid>/qiod.sock`.
pub fn default_socket_path() -> PathBuf {
    let uid = rustix::process::getuid().as_raw();
    socket_path_from(&|key| std::env::var_os(key), uid)
}

/// [`default_socket_path`] over an explicit environment, so config tests need no globals.
pub fn socket_path_from(env: &dyn Fn(&str) -> Option<OsString>, uid: u32) -> PathBuf {
    let set = |key: &str| env(key).filter(|v| !v.is_empty());
    if let Some(path) = set("QIOD_SOCKET") {
        return PathBuf::from(path);
    }
    // The XDG spec says to ignore a relative runtime dir.
    if let Some(dir) = set("XDG_RUNTIME_DIR").map(PathBuf::from) {
        if dir.is_absolute() {
            return dir.join("qiod").join("qiod.sock");
        }
    }
    if uid == 0 {
        PathBuf::from("/run/qiod/qiod.sock")
    } else {
        PathBuf::from(format!("/tmp/qiod-{uid}/qiod.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    #[test]
    fn socket_path_defaults() {
        let env = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, OsString> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), OsString::from(v)))
                .collect();
            move |k: &str| map.get(k).cloned()
        };
        let e = env(&[("XDG_RUNTIME_DIR", "/run/user/1000")]);
        assert_eq!(
            socket_path_from(&e, 1000),
            Path::new("/run/user/1000/qiod/qiod.sock")
        );
        let e = env(&[
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("QIOD_SOCKET", "/x/y.sock"),
        ]);
        assert_eq!(socket_path_from(&e, 1000), Path::new("/x/y.sock"));
        let e = env(&[("XDG_RUNTIME_DIR", "relative")]);
        assert_eq!(socket_path_from(&e, 0), Path::new("/run/qiod/qiod.sock"));
        let e = env(&[("XDG_RUNTIME_DIR", ""), ("QIOD_SOCKET", "")]);
        assert_eq!(
            socket_path_from(&e, 1234),
            Path::new("/tmp/qiod-1234/qiod.sock")
        );
    }
}
