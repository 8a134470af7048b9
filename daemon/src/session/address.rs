//! Server addresses: parsing configured URLs and resolving the target of a `/qio/move`.

use url::Url;

/// Parses a configured server address: `ws` or `wss`.
///
/// `http(s)` is refused rather than rewritten: an operator who pasted a web address
/// should learn that qiod speaks WebSocket, and see the address it will really use.
pub fn parse_server_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s.trim()).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    let web = matches!(url.scheme(), "http" | "https");
    let ws = normalize(url).ok_or_else(|| {
        format!("{s:?} is not a WebSocket address: use ws://host:port/path or wss://")
    })?;
    if web {
        return Err(format!(
            "{s:?} is a web address, but qiod speaks WebSocket: use {ws}"
        ));
    }
    Ok(ws)
}

/// Resolves the address a server asked us to move to, relative to the current one.
///
/// Accepted forms: an absolute URL (`ws://other:8080/`), a scheme-relative one
/// (`//other:8080/`), an absolute path on the same server (`/other/path`) and a bare
/// `host:port[/path]`, which keeps the current scheme.
pub fn resolve_move(current: &Url, target: &str) -> Result<Url, String> {
    let target = target.trim();
    if target.is_empty() {
        return Err("move to an empty address".into());
    }
    if target.contains("://") {
        return Url::parse(target)
            .ok()
            .and_then(normalize)
            .ok_or_else(|| format!("move to {target:?}: not a ws://, wss:// or http(s) address"));
    }
    let joined = if target.starts_with('/') {
        current.join(target)
    } else {
        current.join(&format!("//{target}"))
    };
    joined
        .ok()
        .filter(|u| u.has_host())
        .and_then(normalize)
        .ok_or_else(|| format!("move to {target:?}: not an address"))
}

/// Whether following a move from `from` to `to` would give up TLS (`wss://` to `ws://`).
pub fn drops_tls(from: &Url, to: &Url) -> bool {
    from.scheme() == "wss" && to.scheme() == "ws"
}

fn normalize(mut url: Url) -> Option<Url> {
    let scheme = match url.scheme() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        _ => return None,
    };
    if !url.has_host() {
        return None;
    }
    if url.scheme() != scheme {
        // Changing between special schemes always succeeds in the url crate.
        url.set_scheme(scheme).ok()?;
    }
    Some(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok = [
            ("ws://qio.test:1234/", "ws://qio.test:1234/"),
            (" wss://h:443/x ", "wss://h/x"),
        ];
        for (s, want) in ok {
            assert_eq!(parse_server_url(s).unwrap().as_str(), want, "{s}");
        }
        for s in ["", "h:1", "ftp://h/", "ws://", "/path"] {
            assert!(parse_server_url(s).is_err(), "{s} should fail");
        }
    }

    #[test]
    fn a_web_address_is_refused_with_the_websocket_one() {
        for (s, hint) in [
            ("http://h:1/qio", "use ws://h:1/qio"),
            ("https://h/", "use wss://h/"),
            ("HTTP://h:1", "use ws://h:1/"),
        ] {
            let err = parse_server_url(s).unwrap_err();
            assert!(err.contains("web address"), "{s}: {err}");
            assert!(err.ends_with(hint), "{s}: {err}");
        }
    }

    #[test]
    fn move_table() {
        let cur = Url::parse("wss://a.example:8443/qio").unwrap();
        let cases = [
            ("ws://b:1/", "ws://b:1/"),
            ("https://b/", "wss://b/"),
            ("//b:2/x", "wss://b:2/x"),
            ("/other", "wss://a.example:8443/other"),
            ("b:3", "wss://b:3/"),
            ("b:3/qio", "wss://b:3/qio"),
            ("b.example", "wss://b.example/"),
        ];
        for (t, want) in cases {
            assert_eq!(resolve_move(&cur, t).unwrap().as_str(), want, "{t}");
        }
        for t in ["", "   ", "ftp://b/", "b:notaport", "ws://"] {
            assert!(resolve_move(&cur, t).is_err(), "{t} should fail");
        }
    }

    #[test]
    fn only_wss_to_ws_drops_tls() {
        let url = |s: &str| Url::parse(s).unwrap();
        let cases = [
            ("wss://a/", "ws://b/", true),
            ("wss://a/", "wss://b/", false),
            ("ws://a/", "ws://b/", false),
            ("ws://a/", "wss://b/", false),
        ];
        for (from, to, want) in cases {
            assert_eq!(drops_tls(&url(from), &url(to)), want, "{from} -> {to}");
        }
    }
}
