//! Configuration: command-line flags, `QIOD_*` environment variables and a TOML file.
//!
//! Every key can come from any of the three; a flag beats its variable, which beats the
//! file, which beats the default. One struct, [`Args`], holds either layer: clap parses the
//! command line into it (taking a flag's variable when the flag is not given) and serde
//! parses the file into it, with the same value types, so the file's keys and the flags
//! cannot drift apart. [`load`] then takes each key from the first layer that sets it. The
//! defaults are not written here: they are those of [`SessionConfig::new`],
//! [`DriverConfig::new`] and [`IpcConfig::default`], so the library and the binary cannot
//! disagree. Every error names the key, where the value came from and what is accepted,
//! in one line, because it is what an operator sees when the daemon refuses to start.

pub mod value;

use crate::driver::{DriverConfig, TransportChoice};
use crate::ipc::{IpcConfig, SlowClientPolicy};
use crate::session::{DialectChoice, FireAndForget, SessionConfig};
use crate::socket;
use crate::Settings;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use serde::Deserialize;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use thiserror::Error;
use url::Url;
use value::{
    list, origin, CaFile, Count, Group, LogFilter, Millis, Server, Setting, Size, SocketPath,
    Switch,
};

/// The log filter when neither `log` nor `RUST_LOG` says otherwise.
const DEFAULT_LOG: &str = "info";

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

/// The settings as one layer gives them: the command line (a flag, else its `QIOD_*`
/// variable) or the config file, whose keys are these fields' names. `None` or an empty
/// list means the layer does not set the key.
#[derive(Debug, Clone, Default, Parser, Deserialize)]
#[command(
    name = "qiod",
    version,
    about = "Keeps one Quick.IO connection and shares it with local processes over a Unix socket",
    long_about = None,
    after_help = AFTER_SHORT_HELP,
    after_long_help = AFTER_HELP,
    mut_args(with_default)
)]
#[serde(default, deny_unknown_fields)]
pub struct Args {
    /// Config file (TOML); a missing default file is fine, a missing given one is an error
    #[arg(long, env = "QIOD_CONFIG", value_name = "PATH")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Quick.IO server, ws:// or wss:// (repeat the flag, or separate with commas); required
    #[arg(
        long = "server",
        env = "QIOD_SERVER",
        value_name = "URL",
        value_delimiter = ',',
        help_heading = SERVERS
    )]
    #[serde(deserialize_with = "list")]
    pub servers: Vec<Server>,
    /// PEM file of extra CA certificates to trust for wss:// servers, besides the built-in
    /// web roots (read at start; certificates are always verified)
    #[arg(long, env = "QIOD_CA_FILE", value_name = "PATH", value_hint = clap::ValueHint::FilePath, help_heading = SERVERS)]
    pub ca_file: Option<CaFile>,
    /// Unix socket to listen on
    #[arg(long, env = "QIOD_SOCKET", value_name = "PATH", value_hint = clap::ValueHint::AnyPath, help_heading = ACCESS)]
    pub socket: Option<SocketPath>,
    /// Log filter, like info or qiod=debug,warn (RUST_LOG wins when set)
    #[arg(long, env = "QIOD_LOG", value_name = "FILTER", help_heading = LOGGING)]
    pub log: Option<LogFilter>,
    /// Silence before the daemon pings the server, in ms
    #[arg(long, env = "QIOD_HEARTBEAT_INTERVAL_MS", value_name = "MS", help_heading = TIMING)]
    pub heartbeat_interval_ms: Option<Millis>,
    /// How long a ping may go unanswered before the connection counts as dead, in ms
    #[arg(long, env = "QIOD_PING_TIMEOUT_MS", value_name = "MS", help_heading = TIMING)]
    pub ping_timeout_ms: Option<Millis>,
    /// How long a request waits for the server's answer, in ms
    #[arg(long, env = "QIOD_REQUEST_TIMEOUT_MS", value_name = "MS", help_heading = TIMING)]
    pub request_timeout_ms: Option<Millis>,
    /// Time allowed from connecting to the server's hello, in ms
    #[arg(long, env = "QIOD_HANDSHAKE_TIMEOUT_MS", value_name = "MS", help_heading = TIMING)]
    pub handshake_timeout_ms: Option<Millis>,
    /// First reconnect delay, in ms (doubles after each failure)
    #[arg(long, env = "QIOD_BACKOFF_INITIAL_MS", value_name = "MS", help_heading = TIMING)]
    pub backoff_initial_ms: Option<Millis>,
    /// Longest reconnect delay, in ms
    #[arg(long, env = "QIOD_BACKOFF_MAX_MS", value_name = "MS", help_heading = TIMING)]
    pub backoff_max_ms: Option<Millis>,
    /// Most events held while the server is unreachable
    #[arg(long, env = "QIOD_QUEUE_MAX_EVENTS", value_name = "N", help_heading = BOUNDS)]
    pub queue_max_events: Option<Count>,
    /// Most bytes of events held while the server is unreachable
    #[arg(long, env = "QIOD_QUEUE_MAX_BYTES", value_name = "BYTES", help_heading = BOUNDS)]
    pub queue_max_bytes: Option<Size>,
    /// Most requests waiting for a server answer, all clients together
    #[arg(long, env = "QIOD_MAX_PENDING_CALLBACKS", value_name = "N", help_heading = BOUNDS)]
    pub max_pending_callbacks: Option<Count>,
    /// Most distinct subscribed paths, all clients together
    #[arg(long, env = "QIOD_MAX_SUBSCRIPTIONS", value_name = "N", help_heading = BOUNDS)]
    pub max_subscriptions: Option<Count>,
    /// Largest WebSocket message accepted from the server, in bytes
    #[arg(long, env = "QIOD_MAX_MESSAGE_BYTES", value_name = "BYTES", help_heading = BOUNDS)]
    pub max_message_bytes: Option<Size>,
    /// Most bytes of frames waiting to be written to the server; beyond, the connection
    /// counts as one whose server stopped reading
    #[arg(long, env = "QIOD_WRITE_QUEUE_BYTES", value_name = "BYTES", help_heading = BOUNDS)]
    pub write_queue_bytes: Option<Size>,
    /// Longest request line accepted from a client, in bytes
    #[arg(long, env = "QIOD_MAX_LINE_BYTES", value_name = "BYTES", help_heading = BOUNDS)]
    pub max_line_bytes: Option<Size>,
    /// Events buffered for one client before slow_client applies
    #[arg(long, env = "QIOD_CLIENT_QUEUE_EVENTS", value_name = "N", help_heading = BOUNDS)]
    pub client_queue_events: Option<Count>,
    /// Bytes buffered for one client (events and replies) before slow_client applies
    #[arg(long, env = "QIOD_CLIENT_QUEUE_BYTES", value_name = "BYTES", help_heading = BOUNDS)]
    pub client_queue_bytes: Option<Size>,
    /// How long a client whose session ends (disconnected, shutdown, half-close) may take
    /// to read what is queued for it before its socket is closed, in ms
    #[arg(long, env = "QIOD_CLIENT_CLOSE_GRACE_MS", value_name = "MS", help_heading = TIMING)]
    pub client_close_grace_ms: Option<Millis>,
    /// When every client getting events has half its queue full, how long to stop reading
    /// the server for one of them to catch up before slow_client applies, in ms
    #[arg(long, env = "QIOD_CATCH_UP_WAIT_MS", value_name = "MS", help_heading = TIMING)]
    pub catch_up_wait_ms: Option<Millis>,
    /// What to do with a client that reads too slowly: drop-oldest or disconnect
    #[arg(long, env = "QIOD_SLOW_CLIENT", value_name = "POLICY", help_heading = BOUNDS)]
    pub slow_client: Option<SlowClientPolicy>,
    /// Quick.IO wire dialect: auto (try 0.2, fall back to 0.1), 0.2 or 0.1
    #[arg(long, env = "QIOD_DIALECT", value_name = "DIALECT", help_heading = SERVERS)]
    pub dialect: Option<DialectChoice>,
    /// Transport: auto (WebSocket, falling back to HTTP long polling when the upgrade
    /// fails), websocket or long-poll
    #[arg(long, env = "QIOD_TRANSPORT", value_name = "TRANSPORT", help_heading = SERVERS)]
    pub transport: Option<TransportChoice>,
    /// Longest random wait before the next long poll, in ms
    #[arg(long, env = "QIOD_LONG_POLL_DELAY_MAX_MS", value_name = "MS", help_heading = TIMING)]
    pub long_poll_delay_max_ms: Option<Millis>,
    /// How long a long-poll request may go unanswered before the connection counts as dead,
    /// in ms
    #[arg(long, env = "QIOD_LONG_POLL_TIMEOUT_MS", value_name = "MS", help_heading = TIMING)]
    pub long_poll_timeout_ms: Option<Millis>,
    /// Largest frame the server accepts, in bytes; larger sends are refused locally
    #[arg(long, env = "QIOD_MAX_FRAME_BYTES", value_name = "BYTES", help_heading = SERVERS)]
    pub max_frame_bytes: Option<Size>,
    /// How long a connection must stay open before the reconnect backoff starts over, in ms
    #[arg(long, env = "QIOD_STABLE_AFTER_MS", value_name = "MS", help_heading = TIMING)]
    pub stable_after_ms: Option<Millis>,
    /// Events sent without a callback: once (never sent twice; queued while offline) or
    /// at-least-once (kept until the server was seen to read them; may arrive twice)
    #[arg(long, env = "QIOD_FIRE_AND_FORGET", value_name = "MODE", help_heading = SERVERS)]
    pub fire_and_forget: Option<FireAndForget>,
    /// Follow a server's move from wss:// to a ws:// address (true or false)
    #[arg(long, env = "QIOD_ALLOW_INSECURE_MOVE", value_name = "BOOL", help_heading = SERVERS)]
    pub allow_insecure_move: Option<Switch>,
    /// Most clients connected at once
    #[arg(long, env = "QIOD_MAX_CLIENTS", value_name = "N", help_heading = BOUNDS)]
    pub max_clients: Option<Count>,
    /// Worker threads of the daemon's async runtime: 1 gives the lowest latency and CPU
    /// per request; more help only when qiod itself needs more than one core
    #[arg(long, env = "QIOD_THREADS", value_name = "N", help_heading = BOUNDS)]
    pub threads: Option<Count>,
    /// Most requests one client may have waiting for an answer
    #[arg(long, env = "QIOD_MAX_PENDING_PER_CLIENT", value_name = "N", help_heading = BOUNDS)]
    pub max_pending_per_client: Option<Count>,
    /// Most paths one client may subscribe to
    #[arg(long, env = "QIOD_MAX_SUBSCRIPTIONS_PER_CLIENT", value_name = "N", help_heading = BOUNDS)]
    pub max_subscriptions_per_client: Option<Count>,
    /// Refused clients are logged once per uid per this interval, with a count, in ms
    #[arg(long, env = "QIOD_REFUSAL_LOG_INTERVAL_MS", value_name = "MS", help_heading = ACCESS)]
    pub refusal_log_interval_ms: Option<Millis>,
    /// How often to check that the socket file is still ours (qiod exits if not), in ms
    #[arg(long, env = "QIOD_SOCKET_CHECK_MS", value_name = "MS", help_heading = ACCESS)]
    pub socket_check_ms: Option<Millis>,
    /// Most bytes of request ids kept for one client's requests waiting for an answer
    #[arg(
        long,
        env = "QIOD_MAX_PENDING_ID_BYTES_PER_CLIENT",
        value_name = "BYTES",
        help_heading = BOUNDS
    )]
    pub max_pending_id_bytes_per_client: Option<Size>,
    /// Most server callback requests handed to local clients that are remembered
    #[arg(long, env = "QIOD_MAX_HANDLES", value_name = "N", help_heading = BOUNDS)]
    pub max_handles: Option<Count>,
    /// Most calls from local clients waiting for the upstream session to take them
    #[arg(long, env = "QIOD_COMMAND_CAPACITY", value_name = "N", help_heading = BOUNDS)]
    pub command_capacity: Option<Count>,
    /// Most notices (events, state changes, answers) waiting between the upstream session and the fan-out; beyond, the session stops reading from the server
    #[arg(long, env = "QIOD_NOTICE_CAPACITY", value_name = "N", help_heading = BOUNDS)]
    pub notice_capacity: Option<Count>,
    /// Groups (names or numeric gids) whose members may connect besides our own user
    #[arg(
        long,
        env = "QIOD_ALLOWED_GROUPS",
        value_name = "GROUP",
        value_delimiter = ',',
        help_heading = ACCESS
    )]
    #[serde(deserialize_with = "list")]
    pub allowed_groups: Vec<Group>,
    /// Where each value the command line set came from (its flag or its variable), by key;
    /// filled by [`Args::from_command_line`], for messages about values checked later.
    #[arg(skip)]
    #[serde(skip)]
    pub origins: Vec<(String, Origin)>,
}

impl Args {
    /// Parses a command line (program name first), taking each flag that is not given
    /// from its variable, and notes which of the two every value came from.
    ///
    /// A bad value is an error whose [`invalid_value`] names the key and its source.
    pub fn from_command_line<I, T>(argv: I) -> Result<Args, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cmd = Args::command();
        let matches = cmd.clone().try_get_matches_from(argv)?;
        let mut args = Args::from_arg_matches(&matches)?;
        args.origins = cmd
            .get_arguments()
            .filter_map(|arg| {
                let key = arg.get_id().as_str();
                match matches.value_source(key)? {
                    ValueSource::DefaultValue => None,
                    source => Some((key.to_owned(), origin(arg, source))),
                }
            })
            .collect();
        Ok(args)
    }
}

/// Keeps `-h` to the options most runs need, gives `--help` each option's default (taken
/// from the real defaults) and environment variable, and lets an empty variable count as
/// unset (a unit file's `Environment=QIOD_LOG=`), as a missing one does.
fn with_default(arg: clap::Arg) -> clap::Arg {
    let mut arg = match arg.get_help_heading() {
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
        if std::env::var_os(env).is_some_and(|v| v.is_empty()) {
            arg = arg.env(None::<&'static str>);
        }
    }
    if long == help {
        return arg;
    }
    arg.help(help).long_help(long).hide_env(true)
}

fn default_text(key: &str) -> Option<String> {
    let text = match key {
        // Not the path computed here: the man page is generated from this text and must
        // not depend on who built it.
        "config" => {
            "$XDG_CONFIG_HOME/qiod/config.toml, which is ~/.config/qiod/config.toml unless set"
        }
        "socket" => {
            "$XDG_RUNTIME_DIR/qiod/qiod.sock; as root /run/qiod/qiod.sock; \
             else /tmp/qiod-<uid>/qiod.sock"
        }
        "log" => DEFAULT_LOG,
        "max_frame_bytes" => "none for 0.2, 1024 for 0.1",
        "allowed_groups" => "none",
        "ca_file" => "none: the built-in web roots only",
        "threads" => "1",
        _ => return default_of(key, &default_settings()),
    };
    Some(text.into())
}

/// The default `setting` as `--help` shows it, read as the key's value type `V`.
fn shown<V, S: Setting<V>>(_key: &Option<V>, setting: &S) -> Option<String> {
    setting.shown()
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

/// The keys with one value that land in [`Settings`], each with its place there: the
/// precedence rule, the reload's restart check and `--help`'s defaults all go by this list.
macro_rules! keys {
    ($($key:ident => $($field:ident).+;)*) => {
        /// The precedence rule: the command line (a flag, else its variable, which clap
        /// chose) beats the file, which beats the default already in `settings`.
        fn apply(cli: &Args, file: &Args, settings: &mut Settings) {
            $(if let Some(value) = cli.$key.clone().or_else(|| file.$key.clone()) {
                settings.$($field).+ = Setting::from_value(value);
            })*
        }

        /// The keys whose values differ between `old` and `new`.
        fn changed(old: &Settings, new: &Settings) -> Vec<&'static str> {
            let mut keys = Vec::new();
            $(if old.$($field).+ != new.$($field).+ {
                keys.push(stringify!($key));
            })*
            keys
        }

        fn default_of(key: &str, defaults: &Settings) -> Option<String> {
            match key {
                $(stringify!($key) => shown(&Args::default().$key, &defaults.$($field).+),)*
                _ => None,
            }
        }
    };
}

keys! {
    heartbeat_interval_ms => driver.session.heartbeat_interval;
    ping_timeout_ms => driver.session.ping_timeout;
    request_timeout_ms => driver.session.request_timeout;
    handshake_timeout_ms => driver.session.handshake_timeout;
    backoff_initial_ms => driver.session.backoff_initial;
    backoff_max_ms => driver.session.backoff_max;
    stable_after_ms => driver.session.stable_after;
    queue_max_events => driver.session.queue_max_events;
    queue_max_bytes => driver.session.queue_max_bytes;
    max_pending_callbacks => driver.session.max_pending_callbacks;
    max_subscriptions => driver.session.max_subscriptions;
    dialect => driver.session.dialect;
    max_frame_bytes => driver.session.max_frame_bytes;
    fire_and_forget => driver.session.fire_and_forget;
    allow_insecure_move => driver.session.allow_insecure_move;
    transport => driver.session.transport;
    ca_file => driver.ca_file;
    long_poll_delay_max_ms => driver.long_poll.delay_max;
    long_poll_timeout_ms => driver.long_poll.request_timeout;
    max_message_bytes => driver.max_message_bytes;
    write_queue_bytes => driver.write_queue_bytes;
    command_capacity => driver.command_capacity;
    notice_capacity => driver.notice_capacity;
    max_line_bytes => ipc.max_line_bytes;
    client_queue_events => ipc.client_queue_events;
    client_queue_bytes => ipc.client_queue_bytes;
    client_close_grace_ms => ipc.client_close_grace;
    catch_up_wait_ms => ipc.catch_up_wait;
    slow_client => ipc.slow_client;
    max_clients => ipc.max_clients;
    max_pending_per_client => ipc.max_pending_per_client;
    max_subscriptions_per_client => ipc.max_subscriptions_per_client;
    max_pending_id_bytes_per_client => ipc.max_pending_id_bytes_per_client;
    max_handles => ipc.max_handles;
    refusal_log_interval_ms => ipc.refusal_log_interval;
    socket_check_ms => ipc.socket_check_interval;
}

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

/// A value that is not acceptable for its key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{key} ({origin}): {message}")]
pub struct Invalid {
    /// The key, as spelled in the file.
    pub key: String,
    /// Where the bad value came from.
    pub origin: Origin,
    /// The value and what was expected instead.
    pub message: String,
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
    #[error(transparent)]
    Invalid(#[from] Invalid),
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

/// The bad value behind a command-line error, if that is what it is: the binary prints
/// it as one line and exits 2 like any configuration error. Help, version and usage
/// errors are not: clap prints those.
pub fn invalid_value(e: &clap::Error) -> Option<&Invalid> {
    std::error::Error::source(e)?.downcast_ref()
}

/// The daemon's configuration, resolved from flags, environment, file and defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen (unless systemd passes a socket).
    pub socket: PathBuf,
    /// Worker threads of the binary's runtime.
    pub threads: usize,
    /// The tracing filter the operator configured (`RUST_LOG`, when set, overrides it).
    pub log: String,
    /// What [`crate::run`] needs.
    pub settings: Settings,
    /// The file that was read, if any (a missing default file is not an error).
    pub config_file: Option<PathBuf>,
    args: Args,
}

impl Config {
    /// Where `key`'s value came from, for a message about a value checked after loading
    /// (the CA file's contents): the command line's record, else the file. A value in
    /// hand-built [`Args`] without a file counts as its flag's.
    pub fn origin(&self, key: &str) -> Origin {
        if let Some((_, origin)) = self.args.origins.iter().find(|(k, _)| k == key) {
            return origin.clone();
        }
        match &self.config_file {
            Some(path) => Origin::File(path.clone()),
            None => Origin::Flag(format!("--{}", key.replace('_', "-"))),
        }
    }

    /// Loads the configuration again (for SIGHUP): the file is read anew, the command
    /// line (and the variables it took) is the one the daemon started with.
    pub fn reload(&self) -> Result<Config, ConfigError> {
        load_from(self.args.clone(), default_config_path())
    }

    /// The keys whose values differ in `new` but only take effect on restart: everything
    /// except `servers` and `log`, which a reload applies.
    pub fn needs_restart(&self, new: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.socket != new.socket {
            keys.push("socket");
        }
        if self.threads != new.threads {
            keys.push("threads");
        }
        keys.extend(changed(&self.settings, &new.settings));
        if self.settings.ipc.allowed_gids != new.settings.ipc.allowed_gids {
            keys.push("allowed_groups");
        }
        keys
    }
}

/// Runtime worker threads unless `threads` says otherwise. One: a request's hand-offs
/// (client task, driver, client task) then never wake a second thread, which cost a round
/// trip 20–40 µs and a third more CPU on two cores, and one core carries millions of
/// deliveries a second (BENCHMARKS.md).
const DEFAULT_THREADS: usize = 1;

/// The most runtime worker threads accepted (`threads`).
const MAX_THREADS: usize = 1024;

/// Resolves the configuration from `args` (the command line) and the config file.
pub fn load(args: Args) -> Result<Config, ConfigError> {
    load_from(args, default_config_path())
}

/// [`load`] with the default file given, so tests need no home folder.
fn load_from(args: Args, default_file: Option<PathBuf>) -> Result<Config, ConfigError> {
    let (file, config_file) = read_file(args.config.as_deref(), default_file.as_deref())?;
    let mut settings = default_settings();
    apply(&args, &file, &mut settings);
    let session = &settings.driver.session;
    if session.backoff_initial > session.backoff_max {
        return Err(ConfigError::Conflict(format!(
            "backoff_initial_ms ({}) is larger than backoff_max_ms ({}): the first reconnect \
             delay cannot exceed the longest",
            session.backoff_initial.as_millis(),
            session.backoff_max.as_millis()
        )));
    }

    // Lists follow the same rule: a list the command line gives replaces the file's.
    let servers: Vec<Url> = first(&args.servers, file.servers)
        .into_iter()
        .map(|s| s.0)
        .collect();
    if servers.is_empty() {
        let file = args
            .config
            .clone()
            .or(default_file)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "a config file (--config PATH)".into());
        return Err(ConfigError::NoServers { file });
    }
    settings.driver.session.servers = servers;
    let mut gids = Vec::new();
    for Group(gid) in first(&args.allowed_groups, file.allowed_groups) {
        if !gids.contains(&gid) {
            gids.push(gid);
        }
    }
    settings.ipc.allowed_gids = gids;

    let log = match args.log.clone().or(file.log) {
        Some(LogFilter(log)) => log,
        None => DEFAULT_LOG.to_owned(),
    };
    let socket = match args.socket.clone().or(file.socket) {
        Some(SocketPath(path)) => path,
        None => {
            socket::socket_path_from(&|key| std::env::var_os(key), qio_platform::users::own_uid())
        }
    };

    let threads = args
        .threads
        .or(file.threads)
        .map_or(DEFAULT_THREADS, |Count(n)| n);
    if threads > MAX_THREADS {
        return Err(ConfigError::Conflict(format!(
            "threads ({threads}) is more than {MAX_THREADS}: qiod needs a few threads, not one \
             per client; leave it unset for {DEFAULT_THREADS}"
        )));
    }

    Ok(Config {
        socket,
        threads,
        log,
        settings,
        config_file,
        args,
    })
}

/// Reads the config file: `explicit` must exist, `default` may be missing.
fn read_file(
    explicit: Option<&Path>,
    default: Option<&Path>,
) -> Result<(Args, Option<PathBuf>), ConfigError> {
    let Some(path) = explicit.or(default) else {
        return Ok((Args::default(), None));
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound && explicit.is_none() => {
            return Ok((Args::default(), None))
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let file = serde_path_to_error::deserialize(toml::Deserializer::new(&text)).map_err(|e| {
        // The path names the key also when the key itself is the problem (unknown).
        let key = match e.path().iter().next() {
            Some(serde_path_to_error::Segment::Map { key }) if is_file_key(key) => {
                Some(key.clone())
            }
            _ => None,
        };
        let e = e.into_inner();
        let message = e.message().trim().to_owned();
        match key {
            Some(key) => ConfigError::Invalid(Invalid {
                key,
                origin: Origin::File(path.to_owned()),
                message,
            }),
            // Not valid TOML, or an unknown key.
            None => ConfigError::Syntax {
                path: path.to_owned(),
                line: e
                    .span()
                    .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1)
                    .unwrap_or(0),
                message,
            },
        }
    })?;
    Ok((file, Some(path.to_owned())))
}

/// Whether `key` is one of the file's: every option but those of the command line alone.
fn is_file_key(key: &str) -> bool {
    key != "config"
        && Args::command()
            .get_arguments()
            .any(|arg| arg.get_id() == key)
}

/// A list key: the command line's list, when it gives one, replaces the file's.
fn first<T: Clone>(cli: &[T], file: Vec<T>) -> Vec<T> {
    if cli.is_empty() {
        file
    } else {
        cli.to_vec()
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
    qio_platform::users::gid_of(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Dialect;
    use clap::builder::TypedValueParser;
    use std::ffi::OsStr;
    use std::time::Duration;

    /// The command line `qiod ARGS...`, with the variables of the test process (none of
    /// qiod's are set where the tests run).
    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        Args::from_command_line(std::iter::once("qiod").chain(argv.iter().copied()))
    }

    /// The bad value a command line is refused for.
    fn refused(argv: &[&str]) -> Invalid {
        let err = parse(argv).unwrap_err();
        invalid_value(&err)
            .unwrap_or_else(|| panic!("not a bad value: {err}"))
            .clone()
    }

    fn load_args(argv: &[&str]) -> Result<Config, ConfigError> {
        load_from(parse(argv).unwrap(), None)
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

    fn load_file(path: &Path) -> Result<Config, ConfigError> {
        load_from(args_with_file(path), None)
    }

    fn server_args() -> Args {
        parse(&["--server", "ws://h:1/"]).unwrap()
    }

    /// The key a configuration was refused for.
    fn key_of(err: &ConfigError) -> &str {
        match err {
            ConfigError::Invalid(bad) => &bad.key,
            other => panic!("not a bad value: {other}"),
        }
    }

    #[test]
    fn clap_definition_is_valid() {
        Args::command().debug_assert();
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("[default: 65000]"), "{help}");
        assert!(help.contains("QIOD_PING_TIMEOUT_MS"), "{help}");
        assert!(help.contains("[default: drop-oldest]"), "{help}");
        assert!(help.contains("[default: auto]"), "{help}");
        assert!(help.contains("[default: once]"), "{help}");
    }

    #[test]
    fn threads_are_one_unless_set_and_a_thousand_is_plenty() {
        assert_eq!(load_args(&["--server", "ws://h:1/"]).unwrap().threads, 1);
        let cfg = load_args(&["--server", "ws://h:1/", "--threads", "4"]).unwrap();
        assert_eq!(cfg.threads, 4);
        let err = load_args(&["--server", "ws://h:1/", "--threads", "100000"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("threads (100000) is more than 1024"),
            "{err}"
        );
    }

    #[test]
    fn server_and_socket_flags_are_enough() {
        let cfg = load_args(&["--server", "ws://h:1/", "--socket", "/x/s"]).unwrap();
        assert_eq!(cfg.socket, Path::new("/x/s"));
        assert_eq!(cfg.settings.driver.session.servers[0].as_str(), "ws://h:1/");
        assert_eq!(cfg.log, DEFAULT_LOG);
        assert!(cfg.config_file.is_none());
        // Everything else is the library's default.
        assert!(changed(&cfg.settings, &default_settings()).is_empty());
        assert_eq!(
            cfg.origin("socket"),
            Origin::Flag("--socket".into()),
            "the command line's record"
        );
    }

    #[test]
    fn precedence_flag_file_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            r#"
            servers = ["ws://file:1/"]
            ping_timeout_ms = 4
            handshake_timeout_ms = 6
            socket = "/file.sock"
            log = "warn"
            "#,
        );
        let p = path.to_str().unwrap();
        let cfg = load_args(&["--config", p, "--ping-timeout-ms", "1", "--log", "debug"]).unwrap();
        let s = &cfg.settings.driver.session;
        assert_eq!(s.ping_timeout, Duration::from_millis(1), "flag beats file");
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
        assert_eq!(
            cfg.origin("handshake_timeout_ms"),
            Origin::File(path.clone())
        );

        // Lists: the command line's list replaces the file's; commas and repeats add up.
        let cfg = load_args(&["--config", p, "--server", "ws://flag:1/"]).unwrap();
        let hosts: Vec<_> = cfg
            .settings
            .driver
            .session
            .servers
            .iter()
            .map(|u| u.host_str())
            .collect();
        assert_eq!(hosts, [Some("flag")]);
        let cfg = load_args(&[
            "--config",
            p,
            "--server",
            "ws://flag:1/, ws://flag:2/",
            "--server",
            "ws://flag:3/",
        ])
        .unwrap();
        let ports: Vec<_> = cfg
            .settings
            .driver
            .session
            .servers
            .iter()
            .map(|u| u.port())
            .collect();
        assert_eq!(ports, [Some(1), Some(2), Some(3)]);
    }

    /// clap takes a flag that is not given from its variable; the parser knows which of
    /// the two a value came from, and says so.
    #[test]
    fn a_bad_value_names_the_flag_or_the_variable_it_came_from() {
        let mut cmd = Args::command();
        cmd.build();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == "max_clients")
            .unwrap();
        let bad = |source| {
            let err = value::Parse::<Count>::new()
                .parse_ref_(&cmd, Some(arg), OsStr::new("many"), source)
                .unwrap_err();
            invalid_value(&err).unwrap().to_string()
        };
        assert_eq!(
            bad(ValueSource::EnvVariable),
            "max_clients (from QIOD_MAX_CLIENTS): expected a whole number greater than 0, got \"many\""
        );
        assert_eq!(
            bad(ValueSource::CommandLine),
            "max_clients (from --max-clients): expected a whole number greater than 0, got \"many\""
        );
        assert_eq!(
            refused(&["--max-clients", "many"]).to_string(),
            "max_clients (from --max-clients): expected a whole number greater than 0, got \"many\""
        );
        // clap's own rendering keeps the reason too.
        let err = parse(&["--max-clients", "many"]).unwrap_err().to_string();
        assert!(
            err.contains("expected a whole number greater than 0"),
            "{err}"
        );
        // Help and usage errors are not bad values: clap prints them.
        assert!(invalid_value(&parse(&["--help"]).unwrap_err()).is_none());
        assert!(invalid_value(&parse(&["--no-such-flag"]).unwrap_err()).is_none());
    }

    #[test]
    fn config_file_from_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "servers = 'ws://h:1/'\nmax_clients = 7\n");
        let cfg = load_args(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(cfg.settings.ipc.max_clients, 7);
    }

    #[test]
    fn the_hub_bounds_are_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "servers = 'ws://h:1/'\nmax_handles = 9\nmax_pending_id_bytes_per_client = 100\n",
        );
        let p = path.to_str().unwrap();
        let cfg = load_args(&[
            "--config",
            p,
            "--max-handles",
            "11",
            "--command-capacity",
            "12",
            "--notice-capacity",
            "13",
        ])
        .unwrap();
        assert_eq!(cfg.settings.ipc.max_handles, 11, "the flag wins");
        assert_eq!(cfg.settings.driver.command_capacity, 12);
        assert_eq!(cfg.settings.driver.notice_capacity, 13);
        assert_eq!(cfg.settings.ipc.max_pending_id_bytes_per_client, 100);
        assert_eq!(refused(&["--max-handles", "0"]).key, "max_handles");
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
        let cfg = load_from(server_args(), Some(missing.clone())).unwrap();
        assert!(cfg.config_file.is_none());
        let err = load_from(
            Args {
                config: Some(missing),
                ..server_args()
            },
            None,
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(err.to_string().contains("nope.toml"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "servers = ['ws://h:1/']\n\npingtimeout_ms = 5\n");
        let err = load_file(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Syntax { line: 3, .. }), "{msg}");
        assert!(msg.contains("pingtimeout_ms"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
        // Nor are the command line's own options keys of the file.
        let path = write(&dir, "servers = ['ws://h:1/']\nconfig = 'x.toml'\n");
        assert!(matches!(
            load_file(&path).unwrap_err(),
            ConfigError::Syntax { line: 2, .. }
        ));
        let path = write(&dir, "servers = ['ws://h:1/'\n");
        let err = load_file(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    }

    #[test]
    fn bad_values_name_key_and_expectation() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "servers = ['ws://h:1/']\nping_timeout_ms = 'soon'\n");
        let msg = load_file(&path).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "ping_timeout_ms (in {}): expected a whole number of milliseconds from 1 to \
                 86400000, got \"soon\"",
                path.display()
            )
        );

        let msg = refused(&["--dialect", "0.3"]).to_string();
        assert_eq!(
            msg,
            "dialect (from --dialect): expected auto, 0.2 or 0.1, got \"0.3\""
        );
        let msg = refused(&["--max-frame-bytes", "0"]).to_string();
        assert!(
            msg.starts_with("max_frame_bytes (from --max-frame-bytes)"),
            "{msg}"
        );
        let cfg = load_args(&[
            "--server",
            "ws://h:1/",
            "--dialect",
            "0.1",
            "--max-frame-bytes",
            "2_048",
        ])
        .unwrap();
        assert_eq!(
            cfg.settings.driver.session.dialect,
            DialectChoice::Fixed(Dialect::V01)
        );
        assert_eq!(cfg.settings.driver.session.max_frame_bytes, Some(2048));
        let defaults = load_from(server_args(), None).unwrap().settings;
        assert_eq!(defaults.driver.session.dialect, DialectChoice::Auto);
        assert_eq!(defaults.driver.session.max_frame_bytes, None);

        assert_eq!(
            refused(&["--fire-and-forget", "twice"]).to_string(),
            "fire_and_forget (from --fire-and-forget): expected once or at-least-once, got \"twice\""
        );
        assert_eq!(
            refused(&["--allow-insecure-move", "yes"]).to_string(),
            "allow_insecure_move (from --allow-insecure-move): expected true or false, got \"yes\""
        );
        assert_eq!(
            refused(&["--transport", "pigeon"]).to_string(),
            "transport (from --transport): expected auto, websocket or long-poll, got \"pigeon\""
        );
        let path = write(
            &dir,
            "servers = ['ws://h:1/']\nfire_and_forget = 'at-least-once'\n\
             allow_insecure_move = true\nstable_after_ms = 250\ntransport = 'long-poll'\n",
        );
        let cfg = load_file(&path).unwrap();
        let s = &cfg.settings.driver.session;
        assert_eq!(s.fire_and_forget, FireAndForget::AtLeastOnce);
        assert!(s.allow_insecure_move);
        assert_eq!(s.stable_after, Duration::from_millis(250));
        assert_eq!(
            cfg.settings.driver.session.transport,
            TransportChoice::LongPoll
        );
        let path = write(
            &dir,
            "servers = ['ws://h:1/']\nallow_insecure_move = 'no'\n",
        );
        let msg = load_file(&path).unwrap_err().to_string();
        assert!(msg.contains("expected true or false, got \"no\""), "{msg}");
        let s = &defaults.driver.session;
        assert_eq!(
            (s.fire_and_forget, s.allow_insecure_move),
            (FireAndForget::Once, false),
            "the defaults"
        );

        let msg = refused(&["--slow-client", "explode"]).to_string();
        assert!(msg.starts_with("slow_client (from --slow-client)"), "{msg}");
        assert!(msg.contains("drop-oldest or disconnect"), "{msg}");
        let cfg = load_args(&["--server", "ws://h:1/", "--slow-client", "disconnect"]).unwrap();
        assert_eq!(cfg.settings.ipc.slow_client, SlowClientPolicy::Disconnect);

        let msg = refused(&["--log", "qiod=loud"]).to_string();
        assert!(msg.starts_with("log (from --log)"), "{msg}");
        assert!(msg.contains("expected something like info"), "{msg}");
    }

    /// Every key of the file refuses a value of the wrong type, naming the key and the
    /// file, in one line: the file is read with the same value types as the flags.
    #[test]
    fn every_key_of_the_file_names_itself_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<String> = Args::command()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .filter(|k| !matches!(k.as_str(), "config" | "help" | "version"))
            .collect();
        assert!(keys.len() > 30, "{keys:?}");
        for key in keys {
            let path = write(&dir, &format!("{key} = {{ a = 1 }}\n"));
            let err = load_file(&path).unwrap_err();
            let msg = err.to_string();
            assert_eq!(key_of(&err), key, "{msg}");
            assert!(
                msg.starts_with(&format!("{key} (in {}): expected ", path.display())),
                "{msg}"
            );
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
    }

    #[test]
    fn bad_url_is_an_error() {
        let msg = refused(&["--server", "ftp://h/"]).to_string();
        assert!(msg.starts_with("servers (from --server)"), "{msg}");
        assert!(msg.contains("ftp://h/"), "{msg}");
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "servers = ['ws://h:1/', 'http://h:2/']\n");
        let msg = load_file(&path).unwrap_err().to_string();
        assert!(msg.starts_with("servers (in "), "{msg}");
        assert!(
            msg.contains("qiod speaks WebSocket: use ws://h:2/"),
            "{msg}"
        );
    }

    #[test]
    fn zero_or_huge_bound_is_an_error() {
        for (flag, key) in [
            ("--queue-max-events", "queue_max_events"),
            ("--heartbeat-interval-ms", "heartbeat_interval_ms"),
            ("--max-line-bytes", "max_line_bytes"),
        ] {
            let bad = refused(&[flag, "0"]);
            assert_eq!(bad.key, key);
            assert_eq!(bad.origin, Origin::Flag(flag.into()));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "servers = ['ws://h:1/']\nmax_clients = -1\n");
        let err = load_file(&path).unwrap_err();
        assert_eq!(key_of(&err), "max_clients", "{err}");
        assert!(err.to_string().ends_with("got -1"), "{err}");
        assert_eq!(
            refused(&["--ping-timeout-ms", "99999999999"]).key,
            "ping_timeout_ms"
        );
        // Underscores are fine, as in TOML.
        let cfg = load_args(&["--server", "ws://h:1/", "--queue-max-bytes", "1_000"]).unwrap();
        assert_eq!(cfg.settings.driver.session.queue_max_bytes, 1000);
    }

    #[test]
    fn backoff_order_is_checked() {
        let err = load_args(&[
            "--server",
            "ws://h:1/",
            "--backoff-initial-ms",
            "500",
            "--backoff-max-ms",
            "100",
        ])
        .unwrap_err();
        assert!(matches!(err, ConfigError::Conflict(_)), "{err}");
    }

    #[test]
    fn missing_servers() {
        let err = load_from(Args::default(), Some("/etc/x/config.toml".into())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no server address: pass --server ws://host:port/ or set servers in /etc/x/config.toml"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "servers = []\n");
        let err = load_file(&path).unwrap_err();
        assert!(matches!(err, ConfigError::NoServers { .. }), "{err}");
    }

    #[test]
    fn allowed_groups_by_number_and_name() {
        let cfg = load_args(&[
            "--server",
            "ws://h:1/",
            "--allowed-groups",
            "root,1234",
            "--allowed-groups",
            "0",
        ])
        .unwrap();
        assert_eq!(cfg.settings.ipc.allowed_gids, [0, 1234]);

        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "servers = ['ws://h:1/']\nallowed_groups = ['root', 42]\n",
        );
        let cfg = load_file(&path).unwrap();
        assert_eq!(cfg.settings.ipc.allowed_gids, [0, 42]);

        let msg = refused(&["--allowed-groups", "root,no-such-group-qiod"]).to_string();
        assert!(
            msg.starts_with("allowed_groups (from --allowed-groups)"),
            "{msg}"
        );
        assert!(msg.contains("no-such-group-qiod"), "{msg}");
        let path = write(&dir, "servers = ['ws://h:1/']\nallowed_groups = [true]\n");
        let msg = load_file(&path).unwrap_err().to_string();
        assert!(
            msg.ends_with("): expected a list of strings, got true"),
            "{msg}"
        );
    }

    /// The path is configuration; whether the file holds usable certificates is checked
    /// at start by the TLS module (crate::tls, and the binary's tests).
    #[test]
    fn ca_file_from_flag_or_file() {
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("--ca-file <PATH>"), "{help}");
        assert!(help.contains("QIOD_CA_FILE"), "{help}");
        assert!(
            help.contains("[default: none: the built-in web roots only]"),
            "{help}"
        );
        let old = load_from(server_args(), None).unwrap();
        assert_eq!(old.settings.driver.ca_file, None);

        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
        let path = write(
            &dir,
            &format!(
                "servers = ['ws://h:1/']\nca_file = {:?}\n",
                a.to_str().unwrap()
            ),
        );
        let cfg = load_file(&path).unwrap();
        assert_eq!(cfg.settings.driver.ca_file.as_deref(), Some(a.as_path()));
        assert_eq!(cfg.origin("ca_file"), Origin::File(path.clone()));
        let cfg = load_args(&[
            "--config",
            path.to_str().unwrap(),
            "--ca-file",
            b.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(cfg.settings.driver.ca_file.as_deref(), Some(b.as_path()));
        assert_eq!(cfg.origin("ca_file"), Origin::Flag("--ca-file".into()));

        // Only a restart takes a new file.
        assert_eq!(old.needs_restart(&cfg), ["ca_file"]);

        // An empty or non-string value.
        let msg = refused(&["--ca-file", " "]).to_string();
        assert!(msg.starts_with("ca_file (from --ca-file): "), "{msg}");
        assert!(msg.contains("expected the path of a PEM file"), "{msg}");
        let path = write(&dir, "servers = ['ws://h:1/']\nca_file = ''\n");
        let msg = load_file(&path).unwrap_err().to_string();
        assert!(msg.starts_with("ca_file (in "), "{msg}");
        assert!(msg.contains("expected the path of a PEM file"), "{msg}");
        let path = write(&dir, "servers = ['ws://h:1/']\nca_file = 5\n");
        let msg = load_file(&path).unwrap_err().to_string();
        assert!(msg.starts_with("ca_file (in "), "{msg}");
        assert!(msg.contains("expected a string, got 5"), "{msg}");
    }

    #[test]
    fn reload_rereads_the_file_and_reports_restart_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "servers = ['ws://a:1/']\nmax_clients = 5\nlog = 'warn'\n",
        );
        let cfg = load_args(&[
            "--config",
            path.to_str().unwrap(),
            "--queue-max-events",
            "9",
        ])
        .unwrap();
        write(
            &dir,
            "servers = ['ws://b:1/']\nmax_clients = 6\nlog = 'debug'\n",
        );
        let new = cfg.reload().unwrap();
        assert_eq!(new.settings.driver.session.servers[0].host_str(), Some("b"));
        assert_eq!(new.log, "debug");
        assert_eq!(
            new.settings.driver.session.queue_max_events, 9,
            "the command line stays"
        );
        assert_eq!(cfg.needs_restart(&new), ["max_clients"]);
        // A bad file is refused, and the running configuration stays.
        write(&dir, "servers = ['ws://b:1/']\nmax_clients = 0\n");
        assert_eq!(key_of(&cfg.reload().unwrap_err()), "max_clients");
    }

    #[test]
    fn the_client_byte_bound_and_close_grace_come_from_any_layer() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "servers = [\"ws://h:1/\"]\nclient_queue_bytes = 1_048_576\n",
        );
        let cfg = load_args(&[
            "--config",
            path.to_str().unwrap(),
            "--client-close-grace-ms",
            "50",
        ])
        .unwrap();
        assert_eq!(cfg.settings.ipc.client_queue_bytes, 1_048_576);
        assert_eq!(
            cfg.settings.ipc.client_close_grace,
            Duration::from_millis(50)
        );
        let msg = refused(&["--client-queue-bytes", "0"]).to_string();
        assert!(
            msg.starts_with("client_queue_bytes (from --client-queue-bytes)"),
            "{msg}"
        );
    }

    /// Issue 15: sizes take units in every layer (file, variable, flag), as README
    /// writes them; a bad one names the key, where it came from and what is accepted.
    #[test]
    fn sizes_take_units_in_the_file_variables_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "servers = [\"ws://h:1/\"]\nqueue_max_bytes = \"16 MiB\"\nmax_line_bytes = 2048\nmax_frame_bytes = \"1KiB\"\n",
        );
        let cfg = load_args(&[
            "--config",
            path.to_str().unwrap(),
            "--client-queue-bytes",
            "4KiB",
            "--write-queue-bytes",
            "8 MiB",
        ])
        .unwrap();
        assert_eq!(cfg.settings.driver.session.queue_max_bytes, 16 << 20);
        assert_eq!(cfg.settings.ipc.max_line_bytes, 2048);
        assert_eq!(cfg.settings.driver.session.max_frame_bytes, Some(1024));
        assert_eq!(cfg.settings.ipc.client_queue_bytes, 4096);
        assert_eq!(cfg.settings.driver.write_queue_bytes, 8 << 20);
        let path = write(
            &dir,
            "servers = [\"ws://h:1/\"]\nqueue_max_bytes = \"16 MB\"\n",
        );
        let err = load_file(&path).unwrap_err();
        let msg = err.to_string();
        assert_eq!(key_of(&err), "queue_max_bytes", "{msg}");
        assert!(msg.contains("B, KiB, MiB or GiB"), "{msg}");
        assert!(msg.contains("got \"16 MB\""), "{msg}");
        // Counts that are not sizes still take plain numbers only.
        let msg = refused(&["--max-clients", "4KiB"]).to_string();
        assert!(msg.contains("whole number greater than 0"), "{msg}");
    }
}
