//! The value types of the settings, each read the same way from every layer: from text
//! (a flag, a `QIOD_*` variable, a string in the file) and from the file's other TOML
//! values. clap reads them through [`Parse`], serde through their `Deserialize`, so a bad
//! value gets the same message wherever it was written.

use super::{resolve_group, Invalid, Origin};
use crate::codec::Dialect;
use crate::driver::TransportChoice;
use crate::ipc::SlowClientPolicy;
use crate::session::{parse_server_url, DialectChoice, FireAndForget};
use clap::builder::{TypedValueParser, ValueParserFactory};
use clap::parser::ValueSource;
use serde::{Deserialize, Deserializer};
use std::ffi::OsStr;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use url::Url;

/// Longest accepted duration: a day is far past any sane timeout, and the cap keeps
/// deadline arithmetic (`Instant + Duration`) far from overflowing.
pub const MAX_MILLIS: u64 = 86_400_000;

/// How sizes may be written, for messages.
const SIZE_FORMS: &str =
    "a whole number of bytes, optionally with a unit B, KiB, MiB or GiB (like 1024, 4KiB, \"16 MiB\")";

/// A setting's value type. An error says what is accepted and what was given; the caller
/// adds the key and where the value came from.
pub trait Value: Sized + Clone + Send + Sync + 'static {
    /// Reads a flag's or variable's text, or a string in the file.
    fn from_text(text: &str) -> Result<Self, String>;

    /// Reads a value of the file; only strings unless the type says otherwise.
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::String(text) => Self::from_text(text),
            other => Err(format!("expected a string, got {other}")),
        }
    }
}

/// clap's parser for a [`Value`]. It knows whether the text came from the flag or from
/// its variable, so the error can say which.
#[derive(Debug)]
pub struct Parse<T>(PhantomData<fn() -> T>);

impl<T> Parse<T> {
    /// The parser of `T`.
    pub fn new() -> Self {
        Parse(PhantomData)
    }
}

impl<T> Default for Parse<T> {
    fn default() -> Self {
        Parse::new()
    }
}

impl<T> Clone for Parse<T> {
    fn clone(&self) -> Self {
        Parse::new()
    }
}

impl<T: Value> TypedValueParser for Parse<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        self.parse_ref_(cmd, arg, value, ValueSource::CommandLine)
    }

    fn parse_ref_(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
        source: ValueSource,
    ) -> Result<T, clap::Error> {
        let parsed = match value.to_str() {
            Some(text) => T::from_text(text),
            None => Err(format!("{value:?} is not valid UTF-8")),
        };
        parsed.map_err(|message| {
            let bad = Invalid {
                key: arg.map(|a| a.get_id().to_string()).unwrap_or_default(),
                origin: arg.map_or(Origin::Flag(String::new()), |a| origin(a, source)),
                message,
            };
            // clap's own error for a bad value, carrying ours as its source (which
            // `invalid_value` finds): a closure parser is clap's public way to build one.
            let carry = move |_: &str| Err::<(), Invalid>(bad.clone());
            let shown = value.to_string_lossy();
            match carry.parse_ref(cmd, arg, OsStr::new(shown.as_ref())) {
                Err(e) => e,
                Ok(()) => clap::Error::new(clap::error::ErrorKind::ValueValidation),
            }
        })
    }
}

/// Where clap took a value from: the flag, or its variable.
pub(super) fn origin(arg: &clap::Arg, source: ValueSource) -> Origin {
    match (source, arg.get_env()) {
        (ValueSource::EnvVariable, Some(var)) => Origin::Env(var.to_string_lossy().into_owned()),
        _ => Origin::Flag(format!("--{}", arg.get_long().unwrap_or_default())),
    }
}

/// A list in the file: an array, or one string as a list of one. Numbers are taken as
/// text, since a gid is one.
pub(super) fn list<'de, D: Deserializer<'de>, T: Value>(d: D) -> Result<Vec<T>, D::Error> {
    let value = toml::Value::deserialize(d)?;
    let items = match &value {
        toml::Value::Array(items) => items.as_slice(),
        single => std::slice::from_ref(single),
    };
    items
        .iter()
        .map(|item| match item {
            toml::Value::String(text) => T::from_text(text),
            toml::Value::Integer(i) => T::from_text(&i.to_string()),
            other => Err(format!("expected a list of strings, got {other}")),
        })
        .collect::<Result<_, _>>()
        .map_err(serde::de::Error::custom)
}

/// clap and serde read these [`Value`]s through it.
macro_rules! value_types {
    ($($t:ty),* $(,)?) => {$(
        impl ValueParserFactory for $t {
            type Parser = Parse<$t>;
            fn value_parser() -> Parse<$t> {
                Parse::new()
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let value = toml::Value::deserialize(d)?;
                <$t as Value>::from_toml(&value).map_err(serde::de::Error::custom)
            }
        }
    )*};
}

value_types!(
    Millis,
    Count,
    Size,
    Switch,
    Server,
    Group,
    LogFilter,
    CaFile,
    SocketPath,
    SlowClientPolicy,
    DialectChoice,
    TransportChoice,
    FireAndForget,
);

/// A whole number from `range`, from text (`_` allowed, as in TOML) or a TOML integer.
fn number(
    text: Option<&str>,
    toml: Option<&toml::Value>,
    range: std::ops::RangeInclusive<u64>,
    expected: &str,
) -> Result<u64, String> {
    let (n, shown) = match (text, toml) {
        (Some(text), _) => {
            let digits: String = text.trim().chars().filter(|c| *c != '_').collect();
            (digits.parse().ok(), format!("{text:?}"))
        }
        (None, Some(value)) => (
            value.as_integer().and_then(|i| u64::try_from(i).ok()),
            value.to_string(),
        ),
        (None, None) => (None, String::new()),
    };
    n.filter(|n| range.contains(n))
        .ok_or_else(|| format!("expected {expected}, got {shown}"))
}

/// Most a count or size may be: what a usize holds, so the casts below cannot truncate.
const MAX_COUNT: u64 = usize::MAX as u64;

/// A duration in whole milliseconds, from 1 to [`MAX_MILLIS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Millis(pub Duration);

impl Millis {
    fn read(text: Option<&str>, toml: Option<&toml::Value>) -> Result<Self, String> {
        let expected = format!("a whole number of milliseconds from 1 to {MAX_MILLIS}");
        let n = number(text, toml, 1..=MAX_MILLIS, &expected)?;
        Ok(Millis(Duration::from_millis(n)))
    }
}

impl Value for Millis {
    fn from_text(text: &str) -> Result<Self, String> {
        Millis::read(Some(text), None)
    }
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        Millis::read(None, Some(value))
    }
}

/// A count, at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count(pub usize);

impl Count {
    fn read(text: Option<&str>, toml: Option<&toml::Value>) -> Result<Self, String> {
        let n = number(text, toml, 1..=MAX_COUNT, "a whole number greater than 0")?;
        Ok(Count(n as usize))
    }
}

impl Value for Count {
    fn from_text(text: &str) -> Result<Self, String> {
        Count::read(Some(text), None)
    }
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        Count::read(None, Some(value))
    }
}

/// A size in bytes, at least 1, with an optional unit ([`parse_size`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub usize);

impl Value for Size {
    fn from_text(text: &str) -> Result<Self, String> {
        parse_size(text)
            .filter(|n| (1..=MAX_COUNT).contains(n))
            .map(|n| Size(n as usize))
            .ok_or_else(|| format!("expected a size greater than 0: {SIZE_FORMS}, got {text:?}"))
    }
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::String(text) => Size::from_text(text),
            other => {
                let expected = format!("a size greater than 0: {SIZE_FORMS}");
                let n = number(None, Some(other), 1..=MAX_COUNT, &expected)?;
                Ok(Size(n as usize))
            }
        }
    }
}

/// A size: a whole number (`_` allowed between digits), optionally followed by a binary
/// unit, with or without a space (`1024`, `4KiB`, `16 MiB`); `None` when malformed or
/// too large.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '_'))
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() || digits.starts_with('_') {
        return None;
    }
    let n: u64 = digits.replace('_', "").parse().ok()?;
    let scale: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(scale)
}

/// `true` or `false` (a TOML boolean in the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch(pub bool);

impl Value for Switch {
    fn from_text(text: &str) -> Result<Self, String> {
        match text.trim() {
            "true" => Ok(Switch(true)),
            "false" => Ok(Switch(false)),
            _ => Err(format!("expected true or false, got {text:?}")),
        }
    }
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        value
            .as_bool()
            .map(Switch)
            .ok_or_else(|| format!("expected true or false, got {value}"))
    }
}

/// A Quick.IO server address ([`parse_server_url`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server(pub Url);

impl Value for Server {
    fn from_text(text: &str) -> Result<Self, String> {
        parse_server_url(text).map(Server)
    }
}

/// A group, by name or number, as its gid: a name is looked up when the value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group(pub u32);

impl Value for Group {
    fn from_text(text: &str) -> Result<Self, String> {
        resolve_group(text).map(Group)
    }
}

/// A tracing filter, like `info` or `qiod=debug,warn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFilter(pub String);

impl Value for LogFilter {
    fn from_text(text: &str) -> Result<Self, String> {
        match EnvFilter::builder().parse(text) {
            Ok(_) => Ok(LogFilter(text.to_owned())),
            Err(e) => Err(format!(
                "{text:?} is not a log filter ({e}); expected something like info or qiod=debug,warn"
            )),
        }
    }
}

/// The path of a PEM file of CA certificates. Only the path is configuration: the file
/// is read at start ([`crate::tls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFile(pub PathBuf);

impl Value for CaFile {
    fn from_text(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err(format!(
                "expected the path of a PEM file of CA certificates, got {text:?}"
            ));
        }
        Ok(CaFile(PathBuf::from(text)))
    }
}

/// The socket's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketPath(pub PathBuf);

impl Value for SocketPath {
    fn from_text(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("expected a non-empty path, got \"\"".into());
        }
        Ok(SocketPath(PathBuf::from(text)))
    }
}

/// A setting with a few named values.
pub trait Choice: Copy + PartialEq + Send + Sync + 'static {
    /// Each value with its name, as the flag, the variable and the file write it.
    const NAMES: &'static [(&'static str, Self)];

    /// The name of `self`, as `--help` shows a default.
    fn name_of(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, v)| *v == self)
            .map_or("", |(name, _)| name)
    }
}

impl<T: Choice> Value for T {
    /// A name; `_` may stand for `-`.
    fn from_text(text: &str) -> Result<Self, String> {
        let wanted = text.trim().replace('_', "-");
        if let Some((_, value)) = T::NAMES.iter().find(|(name, _)| *name == wanted) {
            return Ok(*value);
        }
        let names: Vec<&str> = T::NAMES.iter().map(|(name, _)| *name).collect();
        let (last, rest) = names.split_last().unwrap_or((&"", &[]));
        Err(format!(
            "expected {} or {last}, got {text:?}",
            rest.join(", ")
        ))
    }
}

impl Choice for SlowClientPolicy {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("drop-oldest", SlowClientPolicy::DropOldest),
        ("disconnect", SlowClientPolicy::Disconnect),
    ];
}

impl Choice for DialectChoice {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("auto", DialectChoice::Auto),
        ("0.2", DialectChoice::Fixed(Dialect::V02)),
        ("0.1", DialectChoice::Fixed(Dialect::V01)),
    ];
}

impl Choice for TransportChoice {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("auto", TransportChoice::Auto),
        ("websocket", TransportChoice::WebSocket),
        ("long-poll", TransportChoice::LongPoll),
    ];
}

impl Choice for FireAndForget {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("once", FireAndForget::Once),
        ("at-least-once", FireAndForget::AtLeastOnce),
    ];
}

/// A setting's value in [`crate::Settings`], made from what a layer gave.
pub trait Setting<V> {
    /// The setting, from the value.
    fn from_value(value: V) -> Self;
    /// The default as `--help` shows it; `None` for those written out by hand.
    fn shown(&self) -> Option<String>;
}

macro_rules! settings {
    ($($v:ty => $t:ty: |$x:ident| $into:expr, |$d:ident| $shown:expr;)*) => {$(
        impl Setting<$v> for $t {
            fn from_value($x: $v) -> Self {
                $into
            }
            fn shown(&self) -> Option<String> {
                let $d = self;
                $shown
            }
        }
    )*};
}

settings! {
    Millis => Duration: |m| m.0, |d| Some(d.as_millis().to_string());
    Count => usize: |c| c.0, |n| Some(n.to_string());
    Size => usize: |s| s.0, |n| Some(n.to_string());
    Size => Option<usize>: |s| Some(s.0), |_d| None;
    Switch => bool: |s| s.0, |b| Some(b.to_string());
    CaFile => Option<PathBuf>: |c| Some(c.0), |_d| None;
}

impl<T: Choice> Setting<T> for T {
    fn from_value(value: T) -> Self {
        value
    }
    fn shown(&self) -> Option<String> {
        Some(self.name_of().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_a_binary_unit() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("1_024"), Some(1024));
        assert_eq!(parse_size("4KiB"), Some(4096));
        assert_eq!(parse_size(" 16 MiB "), Some(16 << 20));
        assert_eq!(parse_size("2gib"), Some(2 << 30));
        assert_eq!(parse_size("7 B"), Some(7));
        for bad in [
            "",
            "MiB",
            "16 MB",
            "1.5 MiB",
            "-1",
            "_1",
            "16 MiB x",
            "99999999999 GiB",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn choices_name_every_accepted_value() {
        assert_eq!(
            SlowClientPolicy::from_text("explode").unwrap_err(),
            "expected drop-oldest or disconnect, got \"explode\""
        );
        assert_eq!(
            DialectChoice::from_text("0.3").unwrap_err(),
            "expected auto, 0.2 or 0.1, got \"0.3\""
        );
        assert_eq!(
            SlowClientPolicy::from_text(" drop_oldest "),
            Ok(SlowClientPolicy::DropOldest)
        );
        assert_eq!(DialectChoice::Fixed(Dialect::V01).name_of(), "0.1");
        assert_eq!(
            FireAndForget::from_toml(&toml::Value::Integer(1)).unwrap_err(),
            "expected a string, got 1"
        );
    }
}
