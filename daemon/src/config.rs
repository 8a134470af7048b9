//! Configuration: a TOML file, `QIOD_*` environment variables and command-line flags.
//!
//! Every key can come from any of the three; a flag beats the environment, which beats
//! the file, which beats the default. The defaults are not written here: they are those
//! of [`SessionConfig::new`], [`DriverConfig::new`] and [`IpcConfig::default`], so the
//! library and the binary cannot disagree. Every error names the key, where the value
//! came from and what was expected, in one line, because it is what an operator sees when
//! the daemon refuses to start.

use crate::codec::Dialect;
use crate::driver::{DriverConfig, TransportChoice};
use crate::ipc::{IpcConfig, SlowClientPolicy};
use crate::session::{parse_server_url, DialectChoice, FireAndForget, SessionConfig};
use crate::socket;
use crate::Settings;
use clap::Parser;
use serde::Deserialize;
use std::ffi::{CString, OsString};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use tracing_subscriber::EnvFilter;
use url::Url;

/// The log filter when neither `log` nor `RUST_LOG` says otherwise.
const DEFAULT_LOG: &str = "info";

/// Longest accepted duration: a day is far past any sane timeout, and the cap keeps
/// deadline arithmetic (`Instant + Duration`) far from overflowing.
const MAX_MILLIS: u64 = 86_400_000;

const AFTER_HELP: &str = "\
Every option is also a key of the config file, spelled with underscores (ping_timeout_ms = 5000,
servers = [\"ws://host:port/\"]), and an environment variable QIOD_<KEY> (QIOD_SERVER and
QIOD_ALLOWED_GROUPS take comma-separated lists). A flag beats the environment, which beats the
file, which beats the default. Sizes (BYTES) take a unit B, KiB, MiB or GiB: 1024, 4KiB,
\"16 MiB\" (quoted in the file). RUST_LOG, when set, overrides log. SIGHUP re-reads the file:
servers and log apply at once, other changes at the next start.

Exit codes:
  0  stopped by SIGTERM or SIGINT, after a clean shutdown
  1  could not start or stopped on an error (the socket is in use, ...); the reason is on stderr
  2  a configuration or usage error, in one line on stderr; systemd does not restart it

See also: qio(1), the client; man qiod.";

/// What `-h` adds below the common options: where the rest is, and the exit codes.
const AFTER_SHORT_HELP: &str = "\
No server to try it with? In qiod's source tree, cargo run --bin qiod-demo brings one.
qiod --help lists every option (timing, bounds), their defaults and QIOD_* variables.

Exit codes: 0 clean shutdown, 1 could not start or failed, 2 configuration or usage error";

// The headings of `qiod --help`.
const SERVERS: &str = "Servers and dialect";
const TIMING: &str = "Timing";
const BOUNDS: &str = "Bounds";
const ACCESS: &str = "Local socket and access";
const LOGGING: &str = "Logging";

/// The command line; each option can also come from the environment or the config file.
///
/// Values are kept as text so that flag, environment and file values are checked by one
/// parser and a bad one is reported the same way, naming its key, wherever it came from.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "qiod",
    version,
    about = "Keeps one Quick.IO connection and shares it with local processes over a Unix socket",
    long_about = None,
    after_help = AFTER_SHORT_HELP,
    after_long_help = AFTER_HELP,
    mut_args(with_default)
)]
pub struct Args {
    /// Config file (TOML); a missing default file is fine, a missing given one is an error
    #[arg(long, env = "QIOD_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Quick.IO server, ws:// or wss:// (repeat the flag, or separate with commas); required
    #[arg(
        long = "server",
        env = "QIOD_SERVER",
        value_name = "URL",
        value_delimiter = ',',
        help_heading = SERVERS
    )]
    pub servers: Vec<String>,
    /// PEM file of extra CA certificates to trust for wss:// servers, besides the built-in
    /// web roots (read at start; certificates are always verified)
    #[arg(long, env = "QIOD_CA_FILE", value_name = "PATH", help_heading = SERVERS)]
    pub ca_file: Option<String>,
    /// Unix socket to listen on
    #[arg(long, env = "QIOD_SOCKET", value_name = "PATH", help_heading = ACCESS)]
    pub socket: Option<PathBuf>,
    /// Log filter, like info or qiod=debug,warn (RUST_LOG wins when set)
    #[arg(long, env = "QIOD_LOG", value_name = "FILTER", help_heading = LOGGING)]
    pub log: Option<String>,
    /// Silence before the daemon pings the server, in ms
    #[arg(long, env = "QIOD_HEARTBEAT_INTERVAL_MS", value_name = "MS", help_heading = TIMING)]
    pub heartbeat_interval_ms: Option<String>,
    /// How long a ping may go unanswered before the connection counts as dead, in ms
    #[arg(long, env = "QIOD_PING_TIMEOUT_MS", value_name = "MS", help_heading = TIMING)]
    pub ping_timeout_ms: Option<String>,
    /// How long a request waits for the server's answer, in ms
    #[arg(long, env = "QIOD_REQUEST_TIMEOUT_MS", value_name = "MS", help_heading = TIMING)]
    pub request_timeout_ms: Option<String>,
    /// Time allowed from connecting to the server's hello, in ms
    #[arg(long, env = "QIOD_HANDSHAKE_TIMEOUT_MS", value_name = "MS", help_heading = TIMING)]
    pub handshake_timeout_ms: Option<String>,
    /// First reconnect delay, in ms (doubles after each failure)
    #[arg(long, env = "QIOD_BACKOFF_INITIAL_MS", value_name = "MS", help_heading = TIMING)]
    pub backoff_initial_ms: Option<String>,
    /// Longest reconnect delay, in ms
    #[arg(long, env = "QIOD_BACKOFF_MAX_MS", value_name = "MS", help_heading = TIMING)]
    pub backoff_max_ms: Option<String>,
    /// Most events held while the server is unreachable
    #[arg(long, env = "QIOD_QUEUE_MAX_EVENTS", value_name = "N", help_heading = BOUNDS)]
    pub queue_max_events: Option<String>,
    /// Most bytes of events held while the server is unreachable
    #[arg(long, env = "QIOD_QUEUE_MAX_BYTES", value_name = "BYTES", help_heading = BOUNDS)]
    pub queue_max_bytes: Option<String>,
    /// Most requests waiting for a server answer, all clients together
    #[arg(long, env = "QIOD_MAX_PENDING_CALLBACKS", value_name = "N", help_heading = BOUNDS)]
    pub max_pending_callbacks: Option<String>,
    /// Most distinct subscribed paths, all clients together
    #[arg(long, env = "QIOD_MAX_SUBSCRIPTIONS", value_name = "N", help_heading = BOUNDS)]
    pub max_subscriptions: Option<String>,
    /// Largest WebSocket message accepted from the server, in bytes
    #[arg(long, env = "QIOD_MAX_MESSAGE_BYTES", value_name = "BYTES", help_heading = BOUNDS)]
    pub max_message_bytes: Option<String>,
    /// Most bytes of frames waiting to be written to the server; beyond, the connection
    /// counts as one whose server stopped reading
    #[arg(long, env = "QIOD_WRITE_QUEUE_BYTES", value_name = "BYTES", help_heading = BOUNDS)]
    pub write_queue_bytes: Option<String>,
    /// Longest request line accepted from a client, in bytes
    #[arg(long, env = "QIOD_MAX_LINE_BYTES", value_name = "BYTES", help_heading = BOUNDS)]
    pub max_line_bytes: Option<String>,
    /// Events buffered for one client before slow_client applies
    #[arg(long, env = "QIOD_CLIENT_QUEUE_EVENTS", value_name = "N", help_heading = BOUNDS)]
    pub client_queue_events: Option<String>,
    /// Bytes buffered for one client (events and replies) before slow_client applies
    #[arg(long, env = "QIOD_CLIENT_QUEUE_BYTES", value_name = "BYTES", help_heading = BOUNDS)]
    pub client_queue_bytes: Option<String>,
    /// How long a client whose session ends (disconnected, shutdown, half-close) may take
    /// to read what is queued for it before its socket is closed, in ms
    #[arg(long, env = "QIOD_CLIENT_CLOSE_GRACE_MS", value_name = "MS", help_heading = TIMING)]
    pub client_close_grace_ms: Option<String>,
    /// What to do with a client that reads too slowly: drop-oldest or disconnect
    #[arg(long, env = "QIOD_SLOW_CLIENT", value_name = "POLICY", help_heading = BOUNDS)]
    pub slow_client: Option<String>,
    /// Quick.IO wire dialect: auto (try 0.2, fall back to 0.1), 0.2 or 0.1
    #[arg(long, env = "QIOD_DIALECT", value_name = "DIALECT", help_heading = SERVERS)]
    pub dialect: Option<String>,
    /// Transport: auto (WebSocket, falling back to HTTP long polling when the upgrade
    /// fails), websocket or long-poll
    #[arg(long, env = "QIOD_TRANSPORT", value_name = "TRANSPORT", help_heading = SERVERS)]
    pub transport: Option<String>,
    /// Longest random wait before the next long poll, in ms
    #[arg(long, env = "QIOD_LONG_POLL_DELAY_MAX_MS", value_name = "MS", help_heading = TIMING)]
    pub long_poll_delay_max_ms: Option<String>,
    /// How long a long-poll request may go unanswered before the connection counts as dead,
    /// in ms
    #[arg(long, env = "QIOD_LONG_POLL_TIMEOUT_MS", value_name = "MS", help_heading = TIMING)]
    pub long_poll_timeout_ms: Option<String>,
    /// Largest frame the server accepts, in bytes; larger sends are refused locally
    #[arg(long, env = "QIOD_MAX_FRAME_BYTES", value_name = "BYTES", help_heading = SERVERS)]
    pub max_frame_bytes: Option<String>,
    /// How long a connection must stay open before the reconnect backoff starts over, in ms
    #[arg(long, env = "QIOD_STABLE_AFTER_MS", value_name = "MS", help_heading = TIMING)]
    pub stable_after_ms: Option<String>,
    /// Events sent without a callback: once (never sent twice; queued while offline) or
    /// at-least-once (kept until the server was seen to read them; may arrive twice)
    #[arg(long, env = "QIOD_FIRE_AND_FORGET", value_name = "MODE", help_heading = SERVERS)]
    pub fire_and_forget: Option<String>,
    /// Follow a server's move from wss:// to a ws:// address (true or false)
    #[arg(long, env = "QIOD_ALLOW_INSECURE_MOVE", value_name = "BOOL", help_heading = SERVERS)]
    pub allow_insecure_move: Option<String>,
    /// Most clients connected at once
    #[arg(long, env = "QIOD_MAX_CLIENTS", value_name = "N", help_heading = BOUNDS)]
    pub max_clients: Option<String>,
    /// Most requests one client may have waiting for an answer
    #[arg(long, env = "QIOD_MAX_PENDING_PER_CLIENT", value_name = "N", help_heading = BOUNDS)]
    pub max_pending_per_client: Option<String>,
    /// Most paths one client may subscribe to
    #[arg(long, env = "QIOD_MAX_SUBSCRIPTIONS_PER_CLIENT", value_name = "N", help_heading = BOUNDS)]
    pub max_subscriptions_per_client: Option<String>,
    /// Refused clients are logged once per uid per this interval, with a count, in ms
    #[arg(long, env = "QIOD_REFUSAL_LOG_INTERVAL_MS", value_name = "MS", help_heading = ACCESS)]
    pub refusal_log_interval_ms: Option<String>,
    /// How often to check that the socket file is still ours (qiod exits if not), in ms
    #[arg(long, env = "QIOD_SOCKET_CHECK_MS", value_name = "MS", help_heading = ACCESS)]
    pub socket_check_ms: Option<String>,
    /// Most bytes of request ids kept for one client's requests waiting for an answer
    #[arg(
        long,
        env = "QIOD_MAX_PENDING_ID_BYTES_PER_CLIENT",
        value_name = "BYTES"
    , help_heading = BOUNDS)]
    pub max_pending_id_bytes_per_client: Option<String>,
    /// Most server callback requests handed to local clients that are remembered
    #[arg(long, env = "QIOD_MAX_HANDLES", value_name = "N", help_heading = BOUNDS)]
    pub max_handles: Option<String>,
    /// Most calls from local clients waiting for the upstream session to take them
    #[arg(long, env = "QIOD_COMMAND_CAPACITY", value_name = "N", help_heading = BOUNDS)]
    pub command_capacity: Option<String>,
    /// Most notices (events, state changes, answers) waiting between the upstream session and the fan-out; beyond, the session stops reading from the server
    #[arg(long, env = "QIOD_NOTICE_CAPACITY", value_name = "N", help_heading = BOUNDS)]
    pub notice_capacity: Option<String>,
    /// Groups (names or numeric gids) whose members may connect besides our own user
    #[arg(
        long,
        env = "QIOD_ALLOWED_GROUPS",
        value_name = "GROUP",
        value_delimiter = ',',
        help_heading = ACCESS
    )]
    pub allowed_groups: Vec<String>,
}

/// Keeps `-h` to the options most runs need, and gives `--help` each option's default
/// (taken from the real defaults) and environment variable.
fn with_default(arg: clap::Arg) -> clap::Arg {
    let arg = match arg.get_help_heading() {
        Some(TIMING | BOUNDS) => arg.hide_short_help(true),
        _ => arg,
    };
    let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
    let mut long = help.clone();
    if let Some(default) = default_text(arg.get_id().as_str()) {
        long.push_str(&format!(" [default: {default}]"));
    }
    if let Some(env) = arg.get_env() {
        long.push_str(&format!(" [env: {}]", env.to_string_lossy()));
    }
    if long == help {
        return arg;
    }
    arg.help(help).long_help(long).hide_env(true)
}

fn default_text(key: &str) -> Option<String> {
    let defaults = default_settings();
    if let Some(num) = NUMS.iter().find(|n| n.key == key) {
        return Some((num.get)(&defaults).to_string());
    }
    Some(match key {
        // Not the path computed here: the man page is generated from this text and must
        // not depend on who built it.
        "config" => "$XDG_CONFIG_HOME/qiod/config.toml, which is ~/.config/qiod/config.toml \
                     unless set"
            .into(),
        "socket" => "$XDG_RUNTIME_DIR/qiod/qiod.sock; as root /run/qiod/qiod.sock; \
                     else /tmp/qiod-<uid>/qiod.sock"
            .into(),
        "log" => DEFAULT_LOG.into(),
        "slow_client" => slow_client_name(defaults.ipc.slow_client).into(),
        "dialect" => "auto".into(),
        "transport" => "auto".into(),
        "max_frame_bytes" => "none for 0.2, 1024 for 0.1".into(),
        "fire_and_forget" => defaults.driver.session.fire_and_forget.name().into(),
        "allow_insecure_move" => defaults.driver.session.allow_insecure_move.to_string(),
        "allowed_groups" => "none".into(),
        "ca_file" => "none: the built-in web roots only".into(),
        _ => return None,
    })
}

fn default_settings() -> Settings {
    Settings {
        driver: DriverConfig::new(SessionConfig::new(Vec::new())),
        ipc: IpcConfig::default(),
    }
}

/// `$XDG_CONFIG_HOME/qiod/config.toml` (or the platform's equivalent), if there is a home.
pub fn default_config_path() -> Option<PathBuf> {
    directories::BaseDirs::new().map(|dirs| dirs.config_dir().join("qiod").join("config.toml"))
}

/// The file as written: every key optional, values checked later so errors name the key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    servers: Option<toml::Value>,
    ca_file: Option<toml::Value>,
    socket: Option<toml::Value>,
    log: Option<toml::Value>,
    heartbeat_interval_ms: Option<toml::Value>,
    ping_timeout_ms: Option<toml::Value>,
    request_timeout_ms: Option<toml::Value>,
    handshake_timeout_ms: Option<toml::Value>,
    backoff_initial_ms: Option<toml::Value>,
    backoff_max_ms: Option<toml::Value>,
    queue_max_events: Option<toml::Value>,
    queue_max_bytes: Option<toml::Value>,
    max_pending_callbacks: Option<toml::Value>,
    max_subscriptions: Option<toml::Value>,
    max_message_bytes: Option<toml::Value>,
    write_queue_bytes: Option<toml::Value>,
    max_line_bytes: Option<toml::Value>,
    client_queue_events: Option<toml::Value>,
    client_queue_bytes: Option<toml::Value>,
    client_close_grace_ms: Option<toml::Value>,
    slow_client: Option<toml::Value>,
    dialect: Option<toml::Value>,
    transport: Option<toml::Value>,
    long_poll_delay_max_ms: Option<toml::Value>,
    long_poll_timeout_ms: Option<toml::Value>,
    max_frame_bytes: Option<toml::Value>,
    stable_after_ms: Option<toml::Value>,
    fire_and_forget: Option<toml::Value>,
    allow_insecure_move: Option<toml::Value>,
    max_clients: Option<toml::Value>,
    max_pending_per_client: Option<toml::Value>,
    max_subscriptions_per_client: Option<toml::Value>,
    max_pending_id_bytes_per_client: Option<toml::Value>,
    max_handles: Option<toml::Value>,
    command_capacity: Option<toml::Value>,
    notice_capacity: Option<toml::Value>,
    allowed_groups: Option<toml::Value>,
    refusal_log_interval_ms: Option<toml::Value>,
    socket_check_ms: Option<toml::Value>,
}

/// A numeric key: where it is read from and where it lands in [`Settings`].
struct Num {
    key: &'static str,
    millis: bool,
    flag: fn(&Args) -> Option<&str>,
    file: fn(&FileConfig) -> Option<&toml::Value>,
    get: fn(&Settings) -> u64,
    set: fn(&mut Settings, u64),
}

macro_rules! millis {
    ($key:ident => $($field:ident).+) => {
        Num {
            key: stringify!($key),
            millis: true,
            flag: |a| a.$key.as_deref(),
            file: |f| f.$key.as_ref(),
            get: |s| u64::try_from(s.$($field).+.as_millis()).unwrap_or(u64::MAX),
            set: |s, v| s.$($field).+ = Duration::from_millis(v),
        }
    };
}

macro_rules! count {
    ($key:ident => $($field:ident).+) => {
        Num {
            key: stringify!($key),
            millis: false,
            flag: |a| a.$key.as_deref(),
            file: |f| f.$key.as_ref(),
            get: |s| u64::try_from(s.$($field).+).unwrap_or(u64::MAX),
            set: |s, v| s.$($field).+ = usize::try_from(v).unwrap_or(usize::MAX),
        }
    };
}

const NUMS: &[Num] = &[
    millis!(heartbeat_interval_ms => driver.session.heartbeat_interval),
    millis!(ping_timeout_ms => driver.session.ping_timeout),
    millis!(request_timeout_ms => driver.session.request_timeout),
    millis!(handshake_timeout_ms => driver.session.handshake_timeout),
    millis!(backoff_initial_ms => driver.session.backoff_initial),
    millis!(backoff_max_ms => driver.session.backoff_max),
    millis!(stable_after_ms => driver.session.stable_after),
    millis!(long_poll_delay_max_ms => driver.long_poll.delay_max),
    millis!(long_poll_timeout_ms => driver.long_poll.request_timeout),
    count!(queue_max_events => driver.session.queue_max_events),
    count!(queue_max_bytes => driver.session.queue_max_bytes),
    count!(max_pending_callbacks => driver.session.max_pending_callbacks),
    count!(max_subscriptions => driver.session.max_subscriptions),
    count!(max_message_bytes => driver.max_message_bytes),
    count!(write_queue_bytes => driver.write_queue_bytes),
    count!(max_line_bytes => ipc.max_line_bytes),
    count!(client_queue_events => ipc.client_queue_events),
    count!(client_queue_bytes => ipc.client_queue_bytes),
    millis!(client_close_grace_ms => ipc.client_close_grace),
    count!(max_clients => ipc.max_clients),
    count!(max_pending_per_client => ipc.max_pending_per_client),
    count!(max_subscriptions_per_client => ipc.max_subscriptions_per_client),
    millis!(refusal_log_interval_ms => ipc.refusal_log_interval),
    millis!(socket_check_ms => ipc.socket_check_interval),
    count!(max_pending_id_bytes_per_client => ipc.max_pending_id_bytes_per_client),
    count!(max_handles => ipc.max_handles),
    count!(command_capacity => driver.command_capacity),
    count!(notice_capacity => driver.notice_capacity),
];

/// Where a value came from, so an error points the operator at the right place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag (its spelling, like `--ping-timeout-ms`).
    Flag(String),
    /// An environment variable (its name).
    Env(String),
    /// The config file (its path).
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => write!(f, "from {flag}"),
            Origin::Env(var) => write!(f, "from {var}"),
            Origin::File(path) => write!(f, "in {}", path.display()),
        }
    }
}

/// Why the configuration could not be loaded; the daemon exits with code 2 on any.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file exists (or was asked for) but cannot be read.
    #[error("cannot read config file {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The system's answer.
        source: io::Error,
    },
    /// The config file is not valid TOML or has an unknown key.
    #[error("{}:{line}: {message}", .path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The 1-based line of the problem (0 when unknown).
        line: usize,
        /// The parser's explanation, naming the key when it is unknown.
        message: String,
    },
    /// A value is not acceptable for its key.
    #[error("{key} ({origin}): {message}")]
    Invalid {
        /// The key, as spelled in the file.
        key: &'static str,
        /// Where the bad value came from.
        origin: Origin,
        /// The value and what was expected instead.
        message: String,
    },
    /// No server address anywhere; the daemon would have nothing to connect to.
    #[error("no server address: pass --server ws://host:port/ or set servers in {file}")]
    NoServers {
        /// The config file that was (or would have been) read, for the message.
        file: String,
    },
    /// Two keys contradict each other.
    #[error("{0}")]
    Conflict(String),
}

/// The daemon's configuration, resolved from flags, environment, file and defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen (unless systemd passes a socket).
    pub socket: PathBuf,
    /// The tracing filter the operator configured (`RUST_LOG`, when set, overrides it).
    pub log: String,
    /// What [`crate::run`] needs.
    pub settings: Settings,
    /// The file that was read, if any (a missing default file is not an error).
    pub config_file: Option<PathBuf>,
    args: Args,
}

impl Config {
    /// Loads the configuration again (for SIGHUP): the file and environment are read
    /// anew, the command line is the one the daemon started with.
    pub fn reload(&self) -> Result<Config, ConfigError> {
        self.reload_from(&|key| std::env::var_os(key), default_config_path())
    }

    fn reload_from(
        &self,
        env: &dyn Fn(&str) -> Option<OsString>,
        default_file: Option<PathBuf>,
    ) -> Result<Config, ConfigError> {
        load_from(self.args.clone(), env, default_file)
    }

    /// The keys whose values differ in `new` but only take effect on restart: everything
    /// except `servers` and `log`, which a reload applies.
    pub fn needs_restart(&self, new: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.socket != new.socket {
            keys.push("socket");
        }
        for num in NUMS {
            if (num.get)(&self.settings) != (num.get)(&new.settings) {
                keys.push(num.key);
            }
        }
        if self.settings.ipc.slow_client != new.settings.ipc.slow_client {
            keys.push("slow_client");
        }
        let (old, new_s) = (&self.settings.driver.session, &new.settings.driver.session);
        if old.dialect != new_s.dialect {
            keys.push("dialect");
        }
        if self.settings.driver.transport != new.settings.driver.transport {
            keys.push("transport");
        }
        if old.max_frame_bytes != new_s.max_frame_bytes {
            keys.push("max_frame_bytes");
        }
        if old.fire_and_forget != new_s.fire_and_forget {
            keys.push("fire_and_forget");
        }
        if old.allow_insecure_move != new_s.allow_insecure_move {
            keys.push("allow_insecure_move");
        }
        if self.settings.ipc.allowed_gids != new.settings.ipc.allowed_gids {
            keys.push("allowed_groups");
        }
        if self.settings.driver.ca_file != new.settings.driver.ca_file {
            keys.push("ca_file");
        }
        keys
    }
}

/// Resolves the configuration from `args`, the process environment and the config file.
pub fn load(args: Args) -> Result<Config, ConfigError> {
    load_from(args, &|key| std::env::var_os(key), default_config_path())
}

/// [`load`] with the environment and the default file given, so tests need no globals.
fn load_from(
    args: Args,
    env: &dyn Fn(&str) -> Option<OsString>,
    default_file: Option<PathBuf>,
) -> Result<Config, ConfigError> {
    let explicit = args.config.clone().or_else(|| {
        env("QIOD_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let (file, config_file) = read_file(explicit.as_deref(), default_file.as_deref())?;
    let layers = Layers {
        args: &args,
        env,
        file,
        path: config_file.clone().unwrap_or_default(),
    };

    let mut settings = default_settings();
    for num in NUMS {
        let found = layers.find(
            num.key,
            &env_name(num.key),
            (num.flag)(&args),
            (num.file)(&layers.file),
        )?;
        if let Some(found) = found {
            let value = found.number(num)?;
            (num.set)(&mut settings, value);
        }
    }
    let session = &settings.driver.session;
    if session.backoff_initial > session.backoff_max {
        return Err(ConfigError::Conflict(format!(
            "backoff_initial_ms ({}) is larger than backoff_max_ms ({}): the first reconnect \
             delay cannot exceed the longest",
            session.backoff_initial.as_millis(),
            session.backoff_max.as_millis()
        )));
    }

    let servers = layers.servers()?;
    if servers.is_empty() {
        let file = explicit
            .or(default_file)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "a config file (--config PATH)".into());
        return Err(ConfigError::NoServers { file });
    }
    settings.driver.session.servers = servers;

    if let Some(found) = layers.find(
        "slow_client",
        "QIOD_SLOW_CLIENT",
        args.slow_client.as_deref(),
        layers.file.slow_client.as_ref(),
    )? {
        let (text, origin) = found.text("slow_client")?;
        settings.ipc.slow_client =
            parse_slow_client(&text).ok_or_else(|| ConfigError::Invalid {
                key: "slow_client",
                origin,
                message: format!("expected drop-oldest or disconnect, got {text:?}"),
            })?;
    }

    if let Some(found) = layers.find(
        "dialect",
        "QIOD_DIALECT",
        args.dialect.as_deref(),
        layers.file.dialect.as_ref(),
    )? {
        let (text, origin) = found.text("dialect")?;
        settings.driver.session.dialect = match text.trim() {
            "auto" => DialectChoice::Auto,
            "0.2" => DialectChoice::Fixed(Dialect::V02),
            "0.1" => DialectChoice::Fixed(Dialect::V01),
            _ => {
                return Err(ConfigError::Invalid {
                    key: "dialect",
                    origin,
                    message: format!("expected auto, 0.2 or 0.1, got {text:?}"),
                })
            }
        };
    }
    if let Some(found) = layers.find(
        "transport",
        "QIOD_TRANSPORT",
        args.transport.as_deref(),
        layers.file.transport.as_ref(),
    )? {
        let (text, origin) = found.text("transport")?;
        settings.driver.transport = match text.trim() {
            "auto" => TransportChoice::Auto,
            "websocket" => TransportChoice::WebSocket,
            "long-poll" => TransportChoice::LongPoll,
            _ => {
                return Err(ConfigError::Invalid {
                    key: "transport",
                    origin,
                    message: format!("expected auto, websocket or long-poll, got {text:?}"),
                })
            }
        };
    }
    if let Some(found) = layers.find(
        "max_frame_bytes",
        "QIOD_MAX_FRAME_BYTES",
        args.max_frame_bytes.as_deref(),
        layers.file.max_frame_bytes.as_ref(),
    )? {
        let (n, shown, origin) = match found {
            Found::Toml(toml::Value::Integer(i), origin) => {
                (usize::try_from(*i).ok(), i.to_string(), origin)
            }
            other => {
                let (text, origin) = other.text("max_frame_bytes")?;
                let n = parse_size(&text).and_then(|n| usize::try_from(n).ok());
                (n, format!("{text:?}"), origin)
            }
        };
        let n = n.filter(|n| *n > 0).ok_or_else(|| ConfigError::Invalid {
            key: "max_frame_bytes",
            origin,
            message: format!("expected a size greater than 0: {SIZE_FORMS}, got {shown}"),
        })?;
        settings.driver.session.max_frame_bytes = Some(n);
    }

    if let Some(found) = layers.find(
        "fire_and_forget",
        "QIOD_FIRE_AND_FORGET",
        args.fire_and_forget.as_deref(),
        layers.file.fire_and_forget.as_ref(),
    )? {
        let (text, origin) = found.text("fire_and_forget")?;
        settings.driver.session.fire_and_forget = match text.trim() {
            "once" => FireAndForget::Once,
            "at-least-once" => FireAndForget::AtLeastOnce,
            _ => {
                return Err(ConfigError::Invalid {
                    key: "fire_and_forget",
                    origin,
                    message: format!("expected once or at-least-once, got {text:?}"),
                })
            }
        };
    }
    if let Some(found) = layers.find(
        "allow_insecure_move",
        "QIOD_ALLOW_INSECURE_MOVE",
        args.allow_insecure_move.as_deref(),
        layers.file.allow_insecure_move.as_ref(),
    )? {
        settings.driver.session.allow_insecure_move = found.boolean("allow_insecure_move")?;
    }

    settings.ipc.allowed_gids = layers.allowed_gids()?;

    if let Some(found) = layers.find(
        "ca_file",
        "QIOD_CA_FILE",
        args.ca_file.as_deref(),
        layers.file.ca_file.as_ref(),
    )? {
        let (text, origin) = found.text("ca_file")?;
        if text.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "ca_file",
                origin,
                message: format!(
                    "expected the path of a PEM file of CA certificates, got {text:?}"
                ),
            });
        }
        // Read now as well as when the session starts, so a bad file is a configuration
        // error (exit 2, naming the key) rather than a failure after binding the socket.
        let path = PathBuf::from(text);
        if let Err(e) = crate::driver::tls_config(Some(&path)) {
            return Err(ConfigError::Invalid {
                key: "ca_file",
                origin,
                message: e.to_string(),
            });
        }
        settings.driver.ca_file = Some(path);
    }

    let log = match layers.find(
        "log",
        "QIOD_LOG",
        args.log.as_deref(),
        layers.file.log.as_ref(),
    )? {
        None => DEFAULT_LOG.to_owned(),
        Some(found) => {
            let (text, origin) = found.text("log")?;
            if let Err(e) = EnvFilter::builder().parse(&text) {
                return Err(ConfigError::Invalid {
                    key: "log",
                    origin,
                    message: format!(
                        "{text:?} is not a log filter ({e}); expected something like info or qiod=debug,warn"
                    ),
                });
            }
            text
        }
    };

    let socket = layers.socket()?;

    Ok(Config {
        socket,
        log,
        settings,
        config_file,
        args,
    })
}

fn env_name(key: &str) -> String {
    format!("QIOD_{}", key.to_ascii_uppercase())
}

fn flag_name(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// Reads the config file: `explicit` must exist, `default` may be missing.
fn read_file(
    explicit: Option<&Path>,
    default: Option<&Path>,
) -> Result<(FileConfig, Option<PathBuf>), ConfigError> {
    let Some(path) = explicit.or(default) else {
        return Ok((FileConfig::default(), None));
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound && explicit.is_none() => {
            return Ok((FileConfig::default(), None))
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let file = toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        line: e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1)
            .unwrap_or(0),
        message: e.message().trim().to_owned(),
    })?;
    Ok((file, Some(path.to_owned())))
}

/// The three sources, consulted in order of precedence.
struct Layers<'a> {
    args: &'a Args,
    env: &'a dyn Fn(&str) -> Option<OsString>,
    file: FileConfig,
    path: PathBuf,
}

/// A value as found, before it is checked.
enum Found<'a> {
    Text(String, Origin),
    Toml(&'a toml::Value, Origin),
}

impl Found<'_> {
    fn text(self, key: &'static str) -> Result<(String, Origin), ConfigError> {
        match self {
            Found::Text(text, origin) => Ok((text, origin)),
            Found::Toml(toml::Value::String(s), origin) => Ok((s.clone(), origin)),
            Found::Toml(other, origin) => Err(ConfigError::Invalid {
                key,
                origin,
                message: format!("expected a string, got {other}"),
            }),
        }
    }

    fn boolean(self, key: &'static str) -> Result<bool, ConfigError> {
        let (value, shown, origin) = match self {
            Found::Toml(toml::Value::Boolean(b), origin) => (Some(*b), b.to_string(), origin),
            Found::Toml(other, origin) => (None, other.to_string(), origin),
            Found::Text(text, origin) => {
                let value = match text.trim() {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => None,
                };
                (value, format!("{text:?}"), origin)
            }
        };
        value.ok_or_else(|| ConfigError::Invalid {
            key,
            origin,
            message: format!("expected true or false, got {shown}"),
        })
    }

    fn number(self, num: &Num) -> Result<u64, ConfigError> {
        let max = if num.millis {
            MAX_MILLIS
        } else {
            u64::try_from(usize::MAX).unwrap_or(u64::MAX)
        };
        let bytes = is_size(num.key);
        let (value, shown, origin) = match self {
            Found::Text(text, origin) if bytes => (parse_size(&text), format!("{text:?}"), origin),
            Found::Toml(toml::Value::String(text), origin) if bytes => {
                (parse_size(text), format!("{text:?}"), origin)
            }
            Found::Text(text, origin) => {
                let digits: String = text.trim().chars().filter(|c| *c != '_').collect();
                (digits.parse::<u64>().ok(), format!("{text:?}"), origin)
            }
            Found::Toml(toml::Value::Integer(i), origin) => {
                (u64::try_from(*i).ok(), i.to_string(), origin)
            }
            Found::Toml(other, origin) => (None, other.to_string(), origin),
        };
        match value {
            Some(v) if (1..=max).contains(&v) => Ok(v),
            _ => Err(ConfigError::Invalid {
                key: num.key,
                origin,
                message: if num.millis {
                    format!("expected a whole number of milliseconds from 1 to {max}, got {shown}")
                } else if bytes {
                    format!("expected a size greater than 0: {SIZE_FORMS}, got {shown}")
                } else {
                    format!("expected a whole number greater than 0, got {shown}")
                },
            }),
        }
    }
}

impl<'a> Layers<'a> {
    fn env_text(&self, var: &str) -> Result<Option<String>, ConfigError> {
        match (self.env)(var).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => v.into_string().map(Some).map_err(|v| ConfigError::Invalid {
                key: "environment",
                origin: Origin::Env(var.to_owned()),
                message: format!("{v:?} is not valid UTF-8"),
            }),
        }
    }

    /// Flags come from clap, which already fell back to the environment; if the flag's
    /// value is exactly the variable's, blame the variable, as that is likely the source.
    fn flag_origin(&self, var: &str, flag: String, value: &str) -> Origin {
        match self.env_text(var) {
            Ok(Some(v)) if v == value => Origin::Env(var.to_owned()),
            _ => Origin::Flag(flag),
        }
    }

    fn find(
        &self,
        key: &'static str,
        var: &str,
        flag: Option<&str>,
        file: Option<&'a toml::Value>,
    ) -> Result<Option<Found<'a>>, ConfigError> {
        if let Some(v) = flag.filter(|v| !v.is_empty()) {
            let origin = self.flag_origin(var, flag_name(key), v);
            return Ok(Some(Found::Text(v.to_owned(), origin)));
        }
        if let Some(v) = self.env_text(var)? {
            return Ok(Some(Found::Text(v, Origin::Env(var.to_owned()))));
        }
        Ok(file.map(|v| Found::Toml(v, Origin::File(self.path.clone()))))
    }

    /// A list key: repeated or comma-separated flags, a comma-separated variable, or a
    /// TOML array (a single string is taken as a list of one).
    fn find_list(
        &self,
        key: &'static str,
        var: &str,
        flag: String,
        flags: &[String],
        file: Option<&toml::Value>,
    ) -> Result<Option<(Vec<String>, Origin)>, ConfigError> {
        let split = |s: &str| -> Vec<String> {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let flags: Vec<String> = flags.iter().flat_map(|f| split(f)).collect();
        let from_env = self
            .env_text(var)?
            .map(|v| split(&v))
            .filter(|v| !v.is_empty());
        if !flags.is_empty() {
            let origin = if from_env.as_ref() == Some(&flags) {
                Origin::Env(var.to_owned())
            } else {
                Origin::Flag(flag)
            };
            return Ok(Some((flags, origin)));
        }
        if let Some(list) = from_env {
            return Ok(Some((list, Origin::Env(var.to_owned()))));
        }
        let Some(value) = file else {
            return Ok(None);
        };
        let origin = Origin::File(self.path.clone());
        let bad = |v: &toml::Value| ConfigError::Invalid {
            key,
            origin: origin.clone(),
            message: format!("expected a list of strings, got {v}"),
        };
        let list = match value {
            toml::Value::String(s) => vec![s.clone()],
            toml::Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    toml::Value::String(s) => Ok(s.clone()),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    other => Err(bad(other)),
                })
                .collect::<Result<_, _>>()?,
            other => return Err(bad(other)),
        };
        Ok(Some((list, origin)))
    }

    fn servers(&self) -> Result<Vec<Url>, ConfigError> {
        let found = self.find_list(
            "servers",
            "QIOD_SERVER",
            "--server".into(),
            &self.args.servers,
            self.file.servers.as_ref(),
        )?;
        let Some((list, origin)) = found else {
            return Ok(Vec::new());
        };
        list.iter()
            .map(|s| {
                parse_server_url(s).map_err(|message| ConfigError::Invalid {
                    key: "servers",
                    origin: origin.clone(),
                    message,
                })
            })
            .collect()
    }

    fn allowed_gids(&self) -> Result<Vec<u32>, ConfigError> {
        let found = self.find_list(
            "allowed_groups",
            "QIOD_ALLOWED_GROUPS",
            "--allowed-groups".into(),
            &self.args.allowed_groups,
            self.file.allowed_groups.as_ref(),
        )?;
        let Some((list, origin)) = found else {
            return Ok(Vec::new());
        };
        let mut gids = Vec::with_capacity(list.len());
        for name in &list {
            let gid = resolve_group(name).map_err(|message| ConfigError::Invalid {
                key: "allowed_groups",
                origin: origin.clone(),
                message,
            })?;
            if !gids.contains(&gid) {
                gids.push(gid);
            }
        }
        Ok(gids)
    }

    fn socket(&self) -> Result<PathBuf, ConfigError> {
        if let Some(path) = self
            .args
            .socket
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
        {
            return Ok(path.clone());
        }
        if let Some(path) = (self.env)("QIOD_SOCKET").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(path));
        }
        match &self.file.socket {
            Some(toml::Value::String(s)) if !s.is_empty() => Ok(PathBuf::from(s)),
            Some(other) => Err(ConfigError::Invalid {
                key: "socket",
                origin: Origin::File(self.path.clone()),
                message: format!("expected a non-empty path string, got {other}"),
            }),
            // SAFETY: getuid has no preconditions and cannot fail.
            None => Ok(socket::socket_path_from(self.env, unsafe {
                libc::getuid()
            })),
        }
    }
}

/// How sizes may be written, for messages.
const SIZE_FORMS: &str =
    "a whole number of bytes, optionally with a unit B, KiB, MiB or GiB (like 1024, 4KiB, \"16 MiB\")";

/// Whether a key is a size in bytes (and so takes units).
fn is_size(key: &str) -> bool {
    key.ends_with("_bytes")
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

fn parse_slow_client(s: &str) -> Option<SlowClientPolicy> {
    match s.trim() {
        "drop-oldest" | "drop_oldest" => Some(SlowClientPolicy::DropOldest),
        "disconnect" => Some(SlowClientPolicy::Disconnect),
        _ => None,
    }
}

fn slow_client_name(policy: SlowClientPolicy) -> &'static str {
    match policy {
        SlowClientPolicy::DropOldest => "drop-oldest",
        SlowClientPolicy::Disconnect => "disconnect",
    }
}

/// A group name or numeric gid, as a gid.
fn resolve_group(name: &str) -> Result<u32, String> {
    let name = name.trim();
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        return name
            .parse()
            .map_err(|_| format!("{name:?} is too large for a group id"));
    }
    match group_id(name) {
        Ok(Some(gid)) => Ok(gid),
        Ok(None) => Err(format!("no group named {name:?} on this system")),
        Err(e) => Err(format!("cannot look up group {name:?}: {e}")),
    }
}

fn group_id(name: &str) -> io::Result<Option<u32>> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: a zeroed group is a valid out-value (null pointers, gid 0).
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live local of the stated size.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 => return Ok((!result.is_null()).then_some(grp.gr_gid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            // Several C libraries report "no such group" as one of these.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            _ => return Err(io::Error::from_raw_os_error(rc)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn args_with_file(path: &Path) -> Args {
        Args {
            config: Some(path.to_owned()),
            ..Args::default()
        }
    }

    fn server_args() -> Args {
        Args {
            servers: vec!["ws://h:1/".into()],
            ..Args::default()
        }
    }

    fn load_env(args: Args, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        load_from(args, &env(pairs), None)
    }

    #[test]
    fn clap_definition_is_valid() {
        Args::command().debug_assert();
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("[default: 65000]"), "{help}");
        assert!(help.contains("QIOD_PING_TIMEOUT_MS"), "{help}");
        assert!(help.contains("[default: drop-oldest]"), "{help}");
    }

    #[test]
    fn server_and_socket_flags_are_enough() {
        let args =
            Args::try_parse_from(["qiod", "--server", "ws://h:1/", "--socket", "/x/s"]).unwrap();
        let cfg = load_env(args, &[]).unwrap();
        assert_eq!(cfg.socket, Path::new("/x/s"));
        assert_eq!(cfg.settings.driver.session.servers[0].as_str(), "ws://h:1/");
        assert_eq!(cfg.log, DEFAULT_LOG);
        assert!(cfg.config_file.is_none());
        // Everything else is the library's default.
        let d = default_settings();
        for num in NUMS {
            assert_eq!((num.get)(&cfg.settings), (num.get)(&d), "{}", num.key);
        }
        assert_eq!(cfg.settings.ipc.slow_client, d.ipc.slow_client);
    }

    #[test]
    fn precedence_flag_env_file_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            r#"
            servers = ["ws://file:1/"]
            ping_timeout_ms = 4
            request_timeout_ms = 5
            handshake_timeout_ms = 6
            socket = "/file.sock"
            log = "warn"
            "#,
        );
        let args = Args {
            ping_timeout_ms: Some("1".into()),
            ..args_with_file(&path)
        };
        let cfg = load_env(
            args,
            &[
                ("QIOD_PING_TIMEOUT_MS", "2"),
                ("QIOD_REQUEST_TIMEOUT_MS", "3"),
                ("QIOD_LOG", "debug"),
            ],
        )
        .unwrap();
        let s = &cfg.settings.driver.session;
        assert_eq!(s.ping_timeout, Duration::from_millis(1), "flag beats env");
        assert_eq!(
            s.request_timeout,
            Duration::from_millis(3),
            "env beats file"
        );
        assert_eq!(
            s.handshake_timeout,
            Duration::from_millis(6),
            "file beats default"
        );
        assert_eq!(
            s.heartbeat_interval,
            SessionConfig::new(vec![]).heartbeat_interval
        );
        assert_eq!(s.servers[0].as_str(), "ws://file:1/");
        assert_eq!(cfg.socket, Path::new("/file.sock"));
        assert_eq!(cfg.log, "debug");
        assert_eq!(cfg.config_file.as_deref(), Some(path.as_path()));

        // Lists: a flag beats the comma-separated variable, which beats the file.
        let args = Args {
            servers: vec!["ws://flag:1/".into()],
            ..args_with_file(&path)
        };
        let cfg = load_env(args, &[("QIOD_SERVER", "ws://env:1/,ws://env:2/")]).unwrap();
        assert_eq!(cfg.settings.driver.session.servers.len(), 1);
        assert_eq!(
            cfg.settings.driver.session.servers[0].host_str(),
            Some("flag")
        );
        let cfg = load_env(
            args_with_file(&path),
            &[("QIOD_SERVER", "ws://env:1/, ws://env:2/")],
        )
        .unwrap();
        let hosts: Vec<_> = cfg
            .settings
            .driver
            .session
            .servers
            .iter()
            .map(|u| u.port())
            .collect();
        assert_eq!(hosts, [Some(1), Some(2)]);

        // The socket: flag, then QIOD_SOCKET, then file.
        let cfg = load_env(args_with_file(&path), &[("QIOD_SOCKET", "/env.sock")]).unwrap();
        assert_eq!(cfg.socket, Path::new("/env.sock"));
    }

    #[test]
    fn config_file_from_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "servers = 'ws://h:1/'\nmax_clients = 7\n");
        let cfg = load_env(Args::default(), &[("QIOD_CONFIG", path.to_str().unwrap())]).unwrap();
        assert_eq!(cfg.settings.ipc.max_clients, 7);
    }

    #[test]
    fn the_hub_bounds_are_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "servers = 'ws://h:1/'\nmax_handles = 9\nmax_pending_id_bytes_per_client = 100\n",
        );
        let cfg = load_env(
            args_with_file(&path),
            &[
                ("QIOD_MAX_HANDLES", "11"),
                ("QIOD_COMMAND_CAPACITY", "12"),
                ("QIOD_NOTICE_CAPACITY", "13"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.settings.ipc.max_handles, 11, "the variable wins");
        assert_eq!(cfg.settings.driver.command_capacity, 12);
        assert_eq!(cfg.settings.driver.notice_capacity, 13);
        assert_eq!(cfg.settings.ipc.max_pending_id_bytes_per_client, 100);
        let err = load_env(args_with_file(&path), &[("QIOD_MAX_HANDLES", "0")]).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    key: "max_handles",
                    ..
                }
            ),
            "{err}"
        );
        cfg.settings.ipc.validate().unwrap();
        let zero = crate::ipc::IpcConfig {
            max_handles: 0,
            ..crate::ipc::IpcConfig::default()
        };
        assert_eq!(
            zero.validate().unwrap_err().to_string(),
            "max_handles must be at least 1"
        );
    }

    #[test]
    fn default_file_may_be_missing_explicit_may_not() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let cfg = load_from(server_args(), &env(&[]), Some(missing.clone())).unwrap();
        assert!(cfg.config_file.is_none());
        let err = load_env(
            Args {
                config: Some(missing),
                ..server_args()
            },
            &[],
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(err.to_string().contains("nope.toml"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "servers = ['ws://h:1/']\n\npingtimeout_ms = 5\n");
        let err = load_env(args_with_file(&path), &[]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Syntax { line: 3, .. }), "{msg}");
        assert!(msg.contains("pingtimeout_ms"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn bad_values_name_key_and_expectation() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "servers = ['ws://h:1/']\nping_timeout_ms = 'soon'\n");
        let msg = load_env(args_with_file(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("ping_timeout_ms (in "), "{msg}");
        assert!(
            msg.contains("expected a whole number of milliseconds"),
            "{msg}"
        );

        let msg = load_env(server_args(), &[("QIOD_MAX_CLIENTS", "many")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "max_clients (from QIOD_MAX_CLIENTS): expected a whole number greater than 0, got \"many\""
        );

        let args = Args {
            dialect: Some("0.3".into()),
            ..server_args()
        };
        let msg = load_env(args, &[]).unwrap_err().to_string();
        assert!(msg.starts_with("dialect (from --dialect)"), "{msg}");
        let args = Args {
            max_frame_bytes: Some("0".into()),
            ..server_args()
        };
        let msg = load_env(args, &[]).unwrap_err().to_string();
        assert!(
            msg.starts_with("max_frame_bytes (from --max-frame-bytes)"),
            "{msg}"
        );
        let cfg = load_env(
            server_args(),
            &[("QIOD_DIALECT", "0.1"), ("QIOD_MAX_FRAME_BYTES", "2_048")],
        )
        .unwrap();
        assert_eq!(
            cfg.settings.driver.session.dialect,
            DialectChoice::Fixed(Dialect::V01)
        );
        assert_eq!(cfg.settings.driver.session.max_frame_bytes, Some(2048));
        assert_eq!(
            load_env(server_args(), &[])
                .unwrap()
                .settings
                .driver
                .session
                .dialect,
            DialectChoice::Auto
        );

        let msg = load_env(server_args(), &[("QIOD_FIRE_AND_FORGET", "twice")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "fire_and_forget (from QIOD_FIRE_AND_FORGET): expected once or at-least-once, got \"twice\""
        );
        let msg = load_env(server_args(), &[("QIOD_ALLOW_INSECURE_MOVE", "yes")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "allow_insecure_move (from QIOD_ALLOW_INSECURE_MOVE): expected true or false, got \"yes\""
        );
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "servers = ['ws://h:1/']\nfire_and_forget = 'at-least-once'\n\
             allow_insecure_move = true\nstable_after_ms = 250\n",
        );
        let s = load_env(args_with_file(&path), &[])
            .unwrap()
            .settings
            .driver
            .session;
        assert_eq!(s.fire_and_forget, FireAndForget::AtLeastOnce);
        assert!(s.allow_insecure_move);
        assert_eq!(s.stable_after, Duration::from_millis(250));
        let path = write(
            &dir,
            "servers = ['ws://h:1/']\nallow_insecure_move = 'no'\n",
        );
        let msg = load_env(args_with_file(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("expected true or false, got \"no\""), "{msg}");
        let s = load_env(server_args(), &[])
            .unwrap()
            .settings
            .driver
            .session;
        assert_eq!(
            (s.fire_and_forget, s.allow_insecure_move),
            (FireAndForget::Once, false),
            "the defaults"
        );

        let args = Args {
            slow_client: Some("explode".into()),
            ..server_args()
        };
        let msg = load_env(args, &[]).unwrap_err().to_string();
        assert!(msg.starts_with("slow_client (from --slow-client)"), "{msg}");
        assert!(msg.contains("drop-oldest or disconnect"), "{msg}");

        let args = Args {
            log: Some("qiod=loud".into()),
            ..server_args()
        };
        let msg = load_env(args, &[]).unwrap_err().to_string();
        assert!(msg.starts_with("log (from --log)"), "{msg}");
    }

    #[test]
    fn bad_url_is_an_error() {
        let args = Args {
            servers: vec!["ftp://h/".into()],
            ..Args::default()
        };
        let err = load_env(args, &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("servers (from --server)"), "{msg}");
        assert!(msg.contains("ftp://h/"), "{msg}");

        let err = load_env(Args::default(), &[("QIOD_SERVER", "not a url")]).unwrap_err();
        assert!(
            err.to_string().starts_with("servers (from QIOD_SERVER)"),
            "{err}"
        );
    }

    #[test]
    fn zero_or_huge_bound_is_an_error() {
        for (var, key) in [
            ("QIOD_QUEUE_MAX_EVENTS", "queue_max_events"),
            ("QIOD_HEARTBEAT_INTERVAL_MS", "heartbeat_interval_ms"),
            ("QIOD_MAX_LINE_BYTES", "max_line_bytes"),
        ] {
            let err = load_env(server_args(), &[(var, "0")]).unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { key: k, .. } if k == key),
                "{err}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "servers = ['ws://h:1/']\nmax_clients = -1\n");
        let err = load_env(args_with_file(&path), &[]).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    key: "max_clients",
                    ..
                }
            ),
            "{err}"
        );
        let err = load_env(server_args(), &[("QIOD_PING_TIMEOUT_MS", "99999999999")]).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    key: "ping_timeout_ms",
                    ..
                }
            ),
            "{err}"
        );
        // Underscores are fine, as in TOML.
        let cfg = load_env(server_args(), &[("QIOD_QUEUE_MAX_BYTES", "1_000")]).unwrap();
        assert_eq!(cfg.settings.driver.session.queue_max_bytes, 1000);
    }

    #[test]
    fn backoff_order_is_checked() {
        let err = load_env(
            server_args(),
            &[
                ("QIOD_BACKOFF_INITIAL_MS", "500"),
                ("QIOD_BACKOFF_MAX_MS", "100"),
            ],
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Conflict(_)), "{err}");
    }

    #[test]
    fn missing_servers() {
        let err = load_from(
            Args::default(),
            &env(&[]),
            Some("/etc/x/config.toml".into()),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no server address: pass --server ws://host:port/ or set servers in /etc/x/config.toml"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "servers = []\n");
        let err = load_env(args_with_file(&path), &[]).unwrap_err();
        assert!(matches!(err, ConfigError::NoServers { .. }), "{err}");
    }

    #[test]
    fn allowed_groups_by_number_and_name() {
        let args = Args {
            allowed_groups: vec!["root".into(), "1234".into(), "0".into()],
            ..server_args()
        };
        let cfg = load_env(args, &[]).unwrap();
        assert_eq!(cfg.settings.ipc.allowed_gids, [0, 1234]);

        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "servers = ['ws://h:1/']\nallowed_groups = ['root', 42]\n",
        );
        let cfg = load_env(args_with_file(&path), &[]).unwrap();
        assert_eq!(cfg.settings.ipc.allowed_gids, [0, 42]);

        let err = load_env(
            server_args(),
            &[("QIOD_ALLOWED_GROUPS", "root,no-such-group-qiod")],
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("allowed_groups (from QIOD_ALLOWED_GROUPS)"),
            "{msg}"
        );
        assert!(msg.contains("no-such-group-qiod"), "{msg}");
    }

    /// A self-signed CA certificate, PEM.
    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn ca_file_from_flag_env_or_file() {
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("--ca-file <PATH>"), "{help}");
        assert!(help.contains("QIOD_CA_FILE"), "{help}");
        assert!(
            help.contains("[default: none: the built-in web roots only]"),
            "{help}"
        );
        assert_eq!(
            load_env(server_args(), &[])
                .unwrap()
                .settings
                .driver
                .ca_file,
            None
        );

        let dir = tempfile::tempdir().unwrap();
        let pem = ca_pem();
        let (a, b) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
        std::fs::write(&a, &pem).unwrap();
        std::fs::write(&b, &pem).unwrap();
        let path = write(
            &dir,
            &format!(
                "servers = ['ws://h:1/']\nca_file = {:?}\n",
                a.to_str().unwrap()
            ),
        );
        let cfg = load_env(args_with_file(&path), &[]).unwrap();
        assert_eq!(cfg.settings.driver.ca_file.as_deref(), Some(a.as_path()));
        let cfg = load_env(
            args_with_file(&path),
            &[("QIOD_CA_FILE", b.to_str().unwrap())],
        )
        .unwrap();
        assert_eq!(cfg.settings.driver.ca_file.as_deref(), Some(b.as_path()));
        let args = Args::try_parse_from([
            "qiod",
            "--server",
            "wss://h:1/",
            "--ca-file",
            a.to_str().unwrap(),
        ])
        .unwrap();
        let cfg = load_env(args, &[("QIOD_CA_FILE", b.to_str().unwrap())]).unwrap();
        assert_eq!(cfg.settings.driver.ca_file.as_deref(), Some(a.as_path()));

        // Only a restart takes a new file.
        let old = load_env(server_args(), &[]).unwrap();
        assert_eq!(old.needs_restart(&cfg), ["ca_file"]);
    }

    #[test]
    fn a_bad_ca_file_is_an_error_naming_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let check = |path: &Path, expect: &str| {
            let args = Args {
                ca_file: Some(path.to_str().unwrap().to_owned()),
                ..server_args()
            };
            let err = load_env(args, &[]).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, ConfigError::Invalid { key: "ca_file", .. }),
                "{msg}"
            );
            assert!(msg.starts_with("ca_file (from --ca-file): "), "{msg}");
            assert!(msg.contains(path.to_str().unwrap()), "{msg}");
            assert!(msg.contains(expect), "{msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        };
        check(&dir.path().join("missing.pem"), "cannot read");
        check(dir.path(), "cannot read");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        check(&empty, "holds no certificate");
        let key_only = dir.path().join("key.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&key_only, key.serialize_pem()).unwrap();
        check(&key_only, "holds no certificate");
        let der = dir.path().join("ca.der");
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&der, cert.der()).unwrap();
        check(&der, "holds no certificate");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        check(&garbage, "not a valid PEM file");
        let not_a_cert = dir.path().join("not-a-cert.pem");
        std::fs::write(
            &not_a_cert,
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        check(&not_a_cert, "certificate 1 is not a usable CA certificate");

        // An empty or non-string value in the file.
        let path = write(&dir, "servers = ['ws://h:1/']\nca_file = ''\n");
        let msg = load_env(args_with_file(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("ca_file (in "), "{msg}");
        assert!(msg.contains("expected the path of a PEM file"), "{msg}");
        let path = write(&dir, "servers = ['ws://h:1/']\nca_file = 5\n");
        let msg = load_env(args_with_file(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("ca_file (in "), "{msg}");
        assert!(msg.contains("expected a string"), "{msg}");
    }

    #[test]
    fn reload_rereads_the_file_and_reports_restart_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "servers = ['ws://a:1/']\nmax_clients = 5\n");
        let cfg = load_env(args_with_file(&path), &[]).unwrap();
        write(&dir, "servers = ['ws://b:1/']\nmax_clients = 6\n");
        let new = cfg.reload_from(&env(&[]), None).unwrap();
        assert_eq!(new.settings.driver.session.servers[0].host_str(), Some("b"));
        assert_eq!(cfg.needs_restart(&new), ["max_clients"]);
    }

    #[test]
    fn the_client_byte_bound_and_close_grace_come_from_any_layer() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "servers = [\"ws://h:1/\"]\nclient_queue_bytes = 1_048_576\n",
        );
        let cfg = load_env(
            args_with_file(&path),
            &[("QIOD_CLIENT_CLOSE_GRACE_MS", "50")],
        )
        .unwrap();
        assert_eq!(cfg.settings.ipc.client_queue_bytes, 1_048_576);
        assert_eq!(
            cfg.settings.ipc.client_close_grace,
            Duration::from_millis(50)
        );
        let err = load_env(
            Args {
                client_queue_bytes: Some("0".into()),
                ..server_args()
            },
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("client_queue_bytes (from --client-queue-bytes)"),
            "{err}"
        );
    }

    /// Issue 15: sizes take units in every layer (file, variable, flag), as README
    /// writes them; a bad one names the key, where it came from and what is accepted.
    #[test]
    fn sizes_take_units_in_the_file_variables_and_flags() {
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
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "servers = [\"ws://h:1/\"]\nqueue_max_bytes = \"16 MiB\"\nmax_line_bytes = 2048\nmax_frame_bytes = \"1KiB\"\n",
        );
        let cfg = load_env(
            args_with_file(&path),
            &[("QIOD_CLIENT_QUEUE_BYTES", "4KiB")],
        )
        .unwrap();
        assert_eq!(cfg.settings.driver.session.queue_max_bytes, 16 << 20);
        assert_eq!(cfg.settings.ipc.max_line_bytes, 2048);
        assert_eq!(cfg.settings.driver.session.max_frame_bytes, Some(1024));
        assert_eq!(cfg.settings.ipc.client_queue_bytes, 4096);
        let cfg = load_env(
            Args {
                write_queue_bytes: Some("8 MiB".into()),
                ..server_args()
            },
            &[],
        )
        .unwrap();
        assert_eq!(cfg.settings.driver.write_queue_bytes, 8 << 20);
        let path = write(
            &dir,
            "servers = [\"ws://h:1/\"]\nqueue_max_bytes = \"16 MB\"\n",
        );
        let err = load_env(args_with_file(&path), &[]).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    key: "queue_max_bytes",
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains("B, KiB, MiB or GiB"), "{msg}");
        assert!(msg.contains("got \"16 MB\""), "{msg}");
        // Counts that are not sizes still take plain numbers only.
        let err = load_env(server_args(), &[("QIOD_MAX_CLIENTS", "4KiB")]).unwrap_err();
        assert!(
            err.to_string().contains("whole number greater than 0"),
            "{err}"
        );
    }
}
