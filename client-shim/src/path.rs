//! Quick.IO path cleaning, as the daemon applies it to every path it is given.
//!
//! Events come back on the cleaned path, so the client keys its subscriptions by it.
//! The rule is Quick.IO's (`../shared/quickio/WIRE.md`); `tests/paths.rs` checks this
//! copy against the daemon's own `qiod::codec::clean_path`.

/// The path as the daemon and the server see it: events arrive on this form.
///
/// Keeps only `A-Z a-z 0-9 _ - /`, collapses repeated `/`, drops a trailing `/` and makes
/// sure the path starts with `/`. An input with nothing left gives `/`.
///
/// ```
/// assert_eq!(qio_client::clean_path("app/@user/(new)>>>"), "/app/user/new");
/// assert_eq!(qio_client::clean_path("//news//"), "/news");
/// ```
pub fn clean_path(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 1);
    out.push('/');
    for c in raw.chars() {
        match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '_' | '-' => out.push(c),
            '/' if !out.ends_with('/') => out.push('/'),
            _ => {}
        }
    }
    if out.len() > 1 && out.ends_with('/') {
        out.pop();
    }
    out
}
