//! Resource configuration: loading, parsing and validating a resource file.
//!
//! A resource file is TOML and describes one replicated resource and the one
//! or two nodes that hold it:
//!
//! ```toml
//! [resource]
//! name = "r0"
//! protocol = "C"                     # "A" | "B" | "C" (default "C")
//! secret = "s3cret"                  # shared secret (required)
//!
//! [heartbeat]
//! interval_ms = 200                  # default 200
//! timeout_ms = 1000                  # default 1000
//! ack_timeout_ms = 30000             # a request unanswered this long drops the link
//!                                    # (default 30000, and at least twice timeout_ms)
//!
//! [failover]
//! auto_promote = false               # default false
//! after_split_brain = "disconnect"   # or "discard-younger-primary", "discard-least-changes"
//!
//! [sync]
//! rate_mb_s = 0                      # resync rate limit in MiB/s, 0 = unlimited
//! al_extents = 479                   # activity log size in 4 MiB extents, 1..=479 (default 479)
//!
//! [handlers]                         # commands run by `sh -c`; "" or absent = none
//! on_promote = ""
//! on_demote = ""
//! on_split_brain = ""
//! on_peer_lost = ""
//!
//! [[node]]
//! name = "alpha"
//! disk = "/var/lib/twinbd/r0.img"    # regular file or block device
//! meta = "/var/lib/twinbd/r0.meta"   # external metadata file, or "internal"
//! replication = "10.0.0.1:7789"      # replication listen address; the peer connects here
//! nbd = "0.0.0.0:10809"              # NBD export: host:port or unix:/path
//! admin = "/run/twinbd/r0-alpha.sock"
//! ```
//!
//! Rules beyond the TOML syntax:
//!
//! * Unknown keys are rejected everywhere; the error names the key and its
//!   line and column.
//! * `heartbeat.interval_ms`, `heartbeat.timeout_ms` and
//!   `heartbeat.ack_timeout_ms` take either an integer number of milliseconds
//!   or a duration string made of a decimal number and a unit: `us`, `ms`,
//!   `s`, `m` (or `min`) or `h`, e.g. `"200ms"`, `"1s"`, `"1.5s"`, `"2m"`. All
//!   must be greater than zero, the timeout longer than the interval and the
//!   ack timeout longer than the timeout.
//! * Resource and node names are 1 to 63 bytes of `A-Z a-z 0-9 _ . -`.
//! * There is one node (standalone) or two nodes (a replicated pair).
//! * `replication` and a TCP `nbd` address are `host:port`: an IP address
//!   (`10.0.0.1:7789`, `[fd00::1]:7789`) or a host name, resolved when the
//!   file is read (the first address the resolver returns). In a pair, each
//!   node needs its own replication address, with a non-zero port and a
//!   concrete (not unspecified) IP, because the peer connects to it.
//! * `disk`, `admin`, an external `meta` and a `unix:` NBD address must be
//!   absolute paths. Unix socket paths must fit in `sun_path`.
//! * [`Config::load`] additionally checks the file system: every node's disk
//!   must exist and be a regular file or block device, and the directory of
//!   an external metadata file must exist. [`Config::parse_str`] and
//!   [`Config::read`] skip those checks; use [`Config::validate_paths`] or
//!   [`Config::validate_node_paths`] to run them separately.

use std::collections::HashMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
/// Default heartbeat timeout.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Default `heartbeat.ack_timeout_ms`.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Maximum length in bytes of resource and node names.
pub const MAX_NAME_LEN: usize = 63;
/// Maximum number of nodes in a resource.
pub const MAX_NODES: usize = 2;
/// Bytes per unit of `sync.rate_mb_s` (one MiB).
pub const BYTES_PER_MB: u64 = 1024 * 1024;

/// Size of `sockaddr_un::sun_path` on Linux; a path needs one byte for the
/// terminating NUL.
const SUN_PATH_LEN: usize = 108;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// A position in a configuration file (1-based line and column; the column
/// counts characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// Errors from loading, parsing, validating or querying a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read configuration file {}: {source}", .path.display())]
    Read {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// The file is not valid TOML, has an unknown key, or a value has the
    /// wrong type. `line` and `col` are 1-based; 0 means the position is
    /// unknown.
    #[error("{origin}{}: {message}", fmt_line_col(*.line, *.col))]
    Parse {
        /// Name of the configuration source (usually its path).
        origin: String,
        /// 1-based line, or 0 if unknown.
        line: usize,
        /// 1-based column, or 0 if unknown.
        col: usize,
        /// One-line description of the problem.
        message: String,
    },

    /// A key is missing or has an unacceptable value.
    #[error("{origin}{}: {key}: {message}", fmt_at(.at))]
    Invalid {
        /// Name of the configuration source (usually its path).
        origin: String,
        /// Where the offending value (or its table) is, when known.
        at: Option<Location>,
        /// The key, e.g. `resource.name`, `node "beta".replication` or
        /// `node[1].name` when the node has no usable name.
        key: String,
        /// What is wrong and, where possible, what is expected.
        message: String,
    },

    /// The requested node is not part of the resource.
    #[error("{}", no_such_node_message(.origin, .name, *.from_hostname, .available))]
    NoSuchNode {
        /// Name of the configuration source (usually its path).
        origin: String,
        /// The node name that was looked for.
        name: String,
        /// True when `name` is this machine's hostname (no name was given).
        from_hostname: bool,
        /// The node names the configuration does define.
        available: Vec<String>,
    },

    /// No node name was given and this machine's hostname is unusable.
    #[error("cannot determine this machine's hostname ({reason}); pass -n NAME")]
    Hostname {
        /// Why the hostname could not be used.
        reason: String,
    },
}

fn fmt_line_col(line: usize, col: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}:{col}")
    }
}

fn fmt_at(at: &Option<Location>) -> String {
    match at {
        Some(loc) => format!(":{loc}"),
        None => String::new(),
    }
}

fn no_such_node_message(
    origin: &str,
    name: &str,
    from_hostname: bool,
    available: &[String],
) -> String {
    let nodes = if available.is_empty() {
        "none defined".to_string()
    } else {
        available.join(", ")
    };
    if from_hostname {
        format!(
            "no node named {name} (this machine's hostname) in {origin}; pass -n NAME (nodes: {nodes})"
        )
    } else {
        format!("no node named {name} in {origin} (nodes: {nodes})")
    }
}

/// Error from parsing a single value (protocol, duration, address, ...) from
/// a string, e.g. a command-line flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(String);

impl ValueError {
    fn new(message: impl Into<String>) -> Self {
        ValueError(message.into())
    }
}

// ---------------------------------------------------------------------------
// Typed configuration
// ---------------------------------------------------------------------------

/// Replication protocol: when a write is acknowledged to the NBD client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// Asynchronous: once the write is on the local disk and queued for the peer.
    A,
    /// Memory-synchronous: once the peer has received the write.
    B,
    /// Synchronous: once the write is on both disks.
    #[default]
    C,
}

impl Protocol {
    /// The name used in configuration files: `"A"`, `"B"` or `"C"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::A => "A",
            Protocol::B => "B",
            Protocol::C => "C",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = ValueError;

    /// Accepts `A`, `B` or `C` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "A" | "a" => Ok(Protocol::A),
            "B" | "b" => Ok(Protocol::B),
            "C" | "c" => Ok(Protocol::C),
            _ => Err(ValueError::new(format!(
                "unknown protocol {s:?}; expected \"A\", \"B\" or \"C\""
            ))),
        }
    }
}

/// Automatic recovery policy after a split brain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AfterSplitBrain {
    /// Do not resolve automatically; drop the connection and wait for an operator.
    #[default]
    Disconnect,
    /// Discard the changes of the node that became primary last.
    DiscardYoungerPrimary,
    /// Discard the changes of the node with fewer modified blocks.
    DiscardLeastChanges,
}

impl AfterSplitBrain {
    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            AfterSplitBrain::Disconnect => "disconnect",
            AfterSplitBrain::DiscardYoungerPrimary => "discard-younger-primary",
            AfterSplitBrain::DiscardLeastChanges => "discard-least-changes",
        }
    }
}

impl fmt::Display for AfterSplitBrain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AfterSplitBrain {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disconnect" => Ok(AfterSplitBrain::Disconnect),
            "discard-younger-primary" => Ok(AfterSplitBrain::DiscardYoungerPrimary),
            "discard-least-changes" => Ok(AfterSplitBrain::DiscardLeastChanges),
            _ => Err(ValueError::new(format!(
                "unknown policy {s:?}; expected \"disconnect\", \
                 \"discard-younger-primary\" or \"discard-least-changes\""
            ))),
        }
    }
}

/// Where a node keeps its replication metadata.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MetaSpec {
    /// At the end of the backing disk.
    Internal,
    /// In a separate file (absolute path).
    External(PathBuf),
}

impl fmt::Display for MetaSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaSpec::Internal => f.write_str("internal"),
            MetaSpec::External(path) => write!(f, "{}", path.display()),
        }
    }
}

impl FromStr for MetaSpec {
    type Err = ValueError;

    /// Accepts `internal` or an absolute path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "internal" {
            return Ok(MetaSpec::Internal);
        }
        check_abs_path(s)
            .map(MetaSpec::External)
            .map_err(|e| ValueError::new(format!("{e}; expected \"internal\" or an absolute path")))
    }
}

/// Address of the NBD export.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdAddr {
    /// TCP listener.
    Tcp(SocketAddr),
    /// Unix domain socket listener (absolute path).
    Unix(PathBuf),
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddr::Tcp(addr) => write!(f, "{addr}"),
            NbdAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

thread_local! {
    /// Whether host names in addresses are looked up (while [`Config::read`] parses a file).
    static RESOLVE_NAMES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with host names in addresses looked up.
fn resolving_names<T>(f: impl FnOnce() -> T) -> T {
    let before = RESOLVE_NAMES.replace(true);
    let out = f();
    RESOLVE_NAMES.set(before);
    out
}

/// Reads `host:port`: an IP socket address (`10.0.0.1:7789`, `[fd00::1]:7789`), or a host
/// name and a port, resolved now when a file is being read (elsewhere, in pure parsing, a
/// name is refused: no lookups); the first address the system's resolver returns is used
/// (`/etc/gai.conf` orders them). `example` is a literal shown in the error.
pub fn socket_addr(s: &str, example: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let expected =
        format!("expected host:port, such as {example} or a host name with a port, or [IPv6]:port");
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("invalid address {s:?}; {expected}"));
    };
    let valid_host = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    let Ok(port) = port.parse::<u16>() else {
        return Err(format!("invalid port in {s:?}; {expected}"));
    };
    if !valid_host {
        return Err(format!("invalid address {s:?}; {expected}"));
    }
    if !RESOLVE_NAMES.get() {
        return Err(format!(
            "host name {host:?} is looked up only when the resource file is read"
        ));
    }
    match (host, port).to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("host name {host:?} has no address")),
        Err(e) => Err(format!("cannot resolve host name {host:?}: {e}")),
    }
}

impl FromStr for NbdAddr {
    type Err = ValueError;

    /// Accepts `unix:/absolute/path` or `host:port` (see [`socket_addr`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("unix:") {
            let path = check_abs_path(rest).map_err(|e| {
                ValueError::new(format!(
                    "unix socket path {e}; expected unix:/absolute/path"
                ))
            })?;
            check_socket_path_len(&path).map_err(ValueError::new)?;
            return Ok(NbdAddr::Unix(path));
        }
        socket_addr(s, "0.0.0.0:10809")
            .map(NbdAddr::Tcp)
            .map_err(|e| ValueError::new(format!("{e}; or unix:/absolute/path")))
    }
}

/// `[resource]`
///
/// `Debug` output redacts the secret so that configurations can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct ResourceConfig {
    /// Resource name.
    pub name: String,
    /// Replication protocol.
    pub protocol: Protocol,
    /// Shared secret the peers authenticate each other with.
    pub secret: String,
}

impl fmt::Debug for ResourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceConfig")
            .field("name", &self.name)
            .field("protocol", &self.protocol)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// `[heartbeat]`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// Time between heartbeats.
    pub interval: Duration,
    /// Silence after which the peer is considered lost (always > `interval`).
    pub timeout: Duration,
    /// How long a request sent to the peer may go unanswered, while the peer still
    /// answers pings, before the link is dropped (always > `timeout`).
    pub ack_timeout: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval: DEFAULT_HEARTBEAT_INTERVAL,
            timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
        }
    }
}

/// `[failover]`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailoverConfig {
    /// Promote this node automatically when the primary is lost.
    pub auto_promote: bool,
    /// Recovery policy after a split brain.
    pub after_split_brain: AfterSplitBrain,
}

/// `[sync]`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncConfig {
    /// Resync rate limit in MiB/s; 0 means unlimited.
    pub rate_mb_s: u64,
    /// Size of the activity log in 4 MiB extents: the most a resync after a crash of the
    /// connected primary copies, traded against one metadata write each time the writes
    /// move to an extent not in the log.
    pub al_extents: usize,
}

impl Default for SyncConfig {
    fn default() -> SyncConfig {
        SyncConfig {
            rate_mb_s: 0,
            al_extents: crate::meta::ACTIVITY_MAX,
        }
    }
}

impl SyncConfig {
    /// The resync rate limit in bytes per second, or `None` when unlimited.
    pub fn rate_bytes_per_s(&self) -> Option<u64> {
        match self.rate_mb_s {
            0 => None,
            // Validation guarantees no overflow; saturate to be safe for
            // hand-built values.
            n => Some(n.saturating_mul(BYTES_PER_MB)),
        }
    }
}

/// `[handlers]`: shell commands run by `sh -c` on events. `None` means no
/// command (an empty or blank string in the file).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HandlersConfig {
    /// Run after this node became primary.
    pub on_promote: Option<String>,
    /// Run after this node became secondary.
    pub on_demote: Option<String>,
    /// Run when a split brain is detected.
    pub on_split_brain: Option<String>,
    /// Run when the connection to the peer is lost.
    pub on_peer_lost: Option<String>,
    /// Run when this node's disk fails and is detached (a twinbd addition to the contract).
    pub on_disk_failure: Option<String>,
}

/// `[[node]]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Node name (matched against the hostname when no name is given).
    pub name: String,
    /// Backing disk: a regular file or block device (absolute path).
    pub disk: PathBuf,
    /// Metadata location.
    pub meta: MetaSpec,
    /// Replication address: this node listens here and its peer connects here.
    pub replication: SocketAddr,
    /// NBD export address.
    pub nbd: NbdAddr,
    /// Control socket used by the command-line tool (absolute path).
    pub admin: PathBuf,
    /// Faults to inject into the data disk (`disk_faults = "after=N,ranges=A+L,ops=write"`);
    /// for testing failure handling only.
    pub disk_faults: Option<crate::storage::FaultSpec>,
}

/// A validated resource configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `[resource]`
    pub resource: ResourceConfig,
    /// `[heartbeat]`
    pub heartbeat: HeartbeatConfig,
    /// `[failover]`
    pub failover: FailoverConfig,
    /// `[sync]`
    pub sync: SyncConfig,
    /// `[handlers]`
    pub handlers: HandlersConfig,
    /// `[[node]]` entries in file order (one or two).
    pub nodes: Vec<NodeConfig>,
    /// The file this configuration was read from; `None` for [`Config::parse_str`].
    pub path: Option<PathBuf>,
}

impl Config {
    /// Reads, parses and validates the file at `path`, including the file
    /// system checks of [`Config::validate_paths`] for every node.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let config = Config::read(path)?;
        config.validate_paths()?;
        tracing::debug!(
            path = %config.origin(),
            resource = %config.resource.name,
            nodes = config.nodes.len(),
            "loaded configuration"
        );
        Ok(config)
    }

    /// Reads, parses and validates the file at `path` without touching any
    /// path named inside it (see [`Config::validate_node_paths`] to check
    /// only the local node's paths).
    pub fn read(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let origin = path.display().to_string();
        let mut config = resolving_names(|| Config::parse_str(&src, &origin))?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates configuration text. `origin` names the source in
    /// error messages (usually the file name). No file system checks are
    /// made, host names in addresses are refused rather than looked up (only
    /// [`Config::read`] resolves them), and [`Config::path`] is `None`.
    pub fn parse_str(src: &str, origin: &str) -> Result<Config, ConfigError> {
        let cx = Ctx { origin, src };
        let raw: RawConfig = toml::from_str(src).map_err(|e| cx.parse_error(&e))?;
        cx.convert(raw)
    }

    /// Checks, for every node, that the disk exists and is a regular file or
    /// block device, and that an external metadata file's directory exists
    /// (and the file, if present, is a regular file or block device).
    pub fn validate_paths(&self) -> Result<(), ConfigError> {
        self.nodes
            .iter()
            .try_for_each(|node| self.check_node_paths(node))
    }

    /// Like [`Config::validate_paths`] but only for the node called `name`
    /// (useful when the peer's paths do not exist on this machine).
    pub fn validate_node_paths(&self, name: &str) -> Result<(), ConfigError> {
        let node = self.node(Some(name))?;
        self.check_node_paths(node)
    }

    /// Selects a node by name, or by this machine's hostname when `name` is
    /// `None` (the full hostname first, then the part before the first dot).
    pub fn node(&self, name: Option<&str>) -> Result<&NodeConfig, ConfigError> {
        match name {
            Some(name) => self
                .find_node(name)
                .ok_or_else(|| self.no_such_node(name, false)),
            None => {
                let hostname = nix::unistd::gethostname().map_err(|e| ConfigError::Hostname {
                    reason: e.to_string(),
                })?;
                let hostname = hostname.into_string().map_err(|h| ConfigError::Hostname {
                    reason: format!("{h:?} is not valid UTF-8"),
                })?;
                self.node_for_hostname(&hostname)
            }
        }
    }

    /// The other node of the pair, if `name` is a node of this resource and
    /// the resource has two nodes.
    pub fn peer_of(&self, name: &str) -> Option<&NodeConfig> {
        self.find_node(name)?;
        self.nodes.iter().find(|n| n.name != name)
    }

    /// The node names in file order.
    pub fn node_names(&self) -> Vec<&str> {
        self.nodes.iter().map(|n| n.name.as_str()).collect()
    }

    fn find_node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    fn node_for_hostname(&self, hostname: &str) -> Result<&NodeConfig, ConfigError> {
        if hostname.is_empty() {
            return Err(ConfigError::Hostname {
                reason: "the hostname is empty".to_string(),
            });
        }
        if let Some(node) = self.find_node(hostname) {
            return Ok(node);
        }
        if let Some((short, _)) = hostname.split_once('.') {
            if let Some(node) = self.find_node(short) {
                return Ok(node);
            }
        }
        Err(self.no_such_node(hostname, true))
    }

    fn no_such_node(&self, name: &str, from_hostname: bool) -> ConfigError {
        ConfigError::NoSuchNode {
            origin: self.origin(),
            name: name.to_string(),
            from_hostname,
            available: self.nodes.iter().map(|n| n.name.clone()).collect(),
        }
    }

    fn origin(&self) -> String {
        match &self.path {
            Some(path) => path.display().to_string(),
            None => "the configuration".to_string(),
        }
    }

    fn check_node_paths(&self, node: &NodeConfig) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            origin: self.origin(),
            at: None,
            key: node_key(0, Some(&node.name), field),
            message,
        };
        check_device_or_file(&node.disk, true).map_err(|m| invalid("disk", m))?;
        if let MetaSpec::External(meta) = &node.meta {
            check_device_or_file(meta, false).map_err(|m| invalid("meta", m))?;
            let parent = match meta.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("/"),
            };
            match std::fs::metadata(parent) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => {
                    return Err(invalid(
                        "meta",
                        format!("{} is not a directory", parent.display()),
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(invalid(
                        "meta",
                        format!(
                            "directory {} for metadata file {} does not exist",
                            parent.display(),
                            meta.display()
                        ),
                    ))
                }
                Err(e) => {
                    return Err(invalid(
                        "meta",
                        format!("cannot access directory {}: {e}", parent.display()),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// The file holds the shared secret: warn when any user can read it.
pub fn warn_if_world_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(md) = std::fs::metadata(path) {
        let mode = md.permissions().mode();
        if mode & 0o004 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o7777),
                "configuration file contains the resource secret and is world-readable; \
                 consider chmod 600"
            );
        }
    }
}

/// Checks that `path` is a regular file or block device. A missing file is an
/// error only when `must_exist` is set.
fn check_device_or_file(path: &Path, must_exist: bool) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(md) => {
            let ft = md.file_type();
            if ft.is_file() || ft.is_block_device() {
                Ok(())
            } else if ft.is_dir() {
                Err(format!(
                    "{} is a directory; expected a regular file or block device",
                    path.display()
                ))
            } else {
                Err(format!(
                    "{} is not a regular file or block device",
                    path.display()
                ))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if must_exist {
                Err(format!("{} does not exist", path.display()))
            } else {
                Ok(())
            }
        }
        Err(e) => Err(format!("cannot access {}: {e}", path.display())),
    }
}

// ---------------------------------------------------------------------------
// Durations
// ---------------------------------------------------------------------------

/// Parses a duration string: a decimal number followed by a unit, optionally
/// separated by spaces. Units: `us`, `ms`, `s`, `m` or `min`, `h`.
/// Examples: `"200ms"`, `"1s"`, `"1.5s"`, `"2m"`. Zero is accepted here;
/// callers decide whether it is meaningful.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let bad = |why: &str| {
        ValueError::new(format!(
            "invalid duration {s:?}: {why}; expected a number and a unit \
             (us, ms, s, m, h), e.g. \"200ms\", \"1.5s\" or \"2m\""
        ))
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    if number.is_empty() {
        return Err(bad("missing number"));
    }
    let unit_ns: u128 = match unit {
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" | "min" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        "" => return Err(bad("missing unit")),
        _ => return Err(bad(&format!("unknown unit {unit:?}"))),
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
        return Err(bad("malformed number"));
    }
    if int.len() > 20 || frac.len() > 18 {
        return Err(bad("number out of range"));
    }
    let int_v: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad("malformed number"))?
    };
    let frac_ns: u128 = if frac.is_empty() {
        0
    } else {
        let frac_v: u128 = frac.parse().map_err(|_| bad("malformed number"))?;
        // frac_v < 10^18 and unit_ns <= 3.6e12, so this cannot overflow u128.
        frac_v * unit_ns / 10u128.pow(frac.len() as u32)
    };
    let total = int_v
        .checked_mul(unit_ns)
        .and_then(|v| v.checked_add(frac_ns))
        .and_then(|v| u64::try_from(v).ok())
        .ok_or_else(|| bad("number out of range"))?;
    Ok(Duration::from_nanos(total))
}

// ---------------------------------------------------------------------------
// Raw (serde) layer
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    resource: Option<Spanned<RawResource>>,
    heartbeat: Option<RawHeartbeat>,
    failover: Option<RawFailover>,
    sync: Option<RawSync>,
    handlers: Option<RawHandlers>,
    #[serde(default)]
    node: Vec<Spanned<RawNode>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    name: Option<Spanned<String>>,
    protocol: Option<Spanned<String>>,
    secret: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeartbeat {
    interval_ms: Option<Spanned<toml::Value>>,
    timeout_ms: Option<Spanned<toml::Value>>,
    ack_timeout_ms: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    auto_promote: Option<bool>,
    after_split_brain: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    rate_mb_s: Option<Spanned<u64>>,
    al_extents: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandlers {
    on_promote: Option<Spanned<String>>,
    on_demote: Option<Spanned<String>>,
    on_split_brain: Option<Spanned<String>>,
    on_peer_lost: Option<Spanned<String>>,
    on_disk_failure: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<Spanned<String>>,
    disk: Option<Spanned<String>>,
    meta: Option<Spanned<String>>,
    replication: Option<Spanned<String>>,
    nbd: Option<Spanned<String>>,
    admin: Option<Spanned<String>>,
    disk_faults: Option<Spanned<String>>,
}

// ---------------------------------------------------------------------------
// Conversion and validation
// ---------------------------------------------------------------------------

/// Key label for a node field: `node "alpha".disk` when the node has a
/// usable name, otherwise `node[1].disk`.
fn node_key(index: usize, name: Option<&str>, field: &str) -> String {
    match name {
        Some(name) => format!("node {name:?}.{field}"),
        None => format!("node[{index}].{field}"),
    }
}

struct Ctx<'a> {
    origin: &'a str,
    src: &'a str,
}

impl Ctx<'_> {
    fn at(&self, span: &Range<usize>) -> Option<Location> {
        Some(location(self.src, span.start))
    }

    fn invalid(
        &self,
        span: Option<&Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            at: span.and_then(|s| self.at(s)),
            key: key.into(),
            message: message.into(),
        }
    }

    fn required(
        &self,
        value: Option<Spanned<String>>,
        table_span: &Range<usize>,
        key: &str,
    ) -> Result<Spanned<String>, ConfigError> {
        value.ok_or_else(|| self.invalid(Some(table_span), key, "missing required key"))
    }

    /// Turns a TOML/serde error into a one-line [`ConfigError::Parse`] that
    /// keeps the library's message and adds the position and, where it can be
    /// recovered from the source, the table or key it concerns.
    fn parse_error(&self, err: &toml::de::Error) -> ConfigError {
        let message = err
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let Some(span) = err.span() else {
            return ConfigError::Parse {
                origin: self.origin.to_string(),
                line: 0,
                col: 0,
                message,
            };
        };
        let loc = location(self.src, span.start);
        let table = table_context(self.src, span.start);
        let message = if let Some(rest) = message.strip_prefix("unknown field `") {
            // "unknown field `foo`, expected ..." -> "unknown field `foo` in [heartbeat], expected ..."
            match rest.find('`') {
                Some(end) => format!(
                    "unknown field `{}` {}{}",
                    &rest[..end],
                    table.describe(),
                    &rest[end + 1..]
                ),
                None => message,
            }
        } else if let Some(key) = key_at(self.src, span.start) {
            format!("{}: {message}", table.key_path(&key))
        } else {
            message
        };
        ConfigError::Parse {
            origin: self.origin.to_string(),
            line: loc.line,
            col: loc.col,
            message,
        }
    }

    fn convert(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let resource = self.convert_resource(raw.resource)?;
        let heartbeat = self.convert_heartbeat(raw.heartbeat)?;
        let failover = self.convert_failover(raw.failover)?;
        let sync = self.convert_sync(raw.sync)?;
        let handlers = self.convert_handlers(raw.handlers)?;
        let nodes = self.convert_nodes(raw.node)?;
        Ok(Config {
            resource,
            heartbeat,
            failover,
            sync,
            handlers,
            nodes,
            path: None,
        })
    }

    fn convert_resource(
        &self,
        raw: Option<Spanned<RawResource>>,
    ) -> Result<ResourceConfig, ConfigError> {
        let Some(raw) = raw else {
            return Err(self.invalid(None, "resource", "missing required table [resource]"));
        };
        let span = raw.span();
        let raw = raw.into_inner();

        let name = self.required(raw.name, &span, "resource.name")?;
        check_name(name.get_ref())
            .map_err(|m| self.invalid(Some(&name.span()), "resource.name", m))?;

        let protocol = match raw.protocol {
            None => Protocol::default(),
            Some(p) => p
                .get_ref()
                .parse()
                .map_err(|e: ValueError| self.invalid(Some(&p.span()), "resource.protocol", e.0))?,
        };

        let secret = self.required(raw.secret, &span, "resource.secret")?;
        if secret.get_ref().is_empty() {
            return Err(self.invalid(Some(&secret.span()), "resource.secret", "must not be empty"));
        }

        Ok(ResourceConfig {
            name: name.into_inner(),
            protocol,
            secret: secret.into_inner(),
        })
    }

    fn convert_heartbeat(&self, raw: Option<RawHeartbeat>) -> Result<HeartbeatConfig, ConfigError> {
        let Some(raw) = raw else {
            return Ok(HeartbeatConfig::default());
        };
        let value = |v: &Option<Spanned<toml::Value>>,
                     key: &str,
                     default: Duration|
         -> Result<Duration, ConfigError> {
            let Some(v) = v else { return Ok(default) };
            let d =
                duration_value(v.get_ref()).map_err(|m| self.invalid(Some(&v.span()), key, m))?;
            if d.is_zero() {
                return Err(self.invalid(Some(&v.span()), key, "must be greater than 0"));
            }
            Ok(d)
        };
        let interval = value(
            &raw.interval_ms,
            "heartbeat.interval_ms",
            DEFAULT_HEARTBEAT_INTERVAL,
        )?;
        let timeout = value(
            &raw.timeout_ms,
            "heartbeat.timeout_ms",
            DEFAULT_HEARTBEAT_TIMEOUT,
        )?;
        if timeout <= interval {
            let span = raw
                .timeout_ms
                .as_ref()
                .or(raw.interval_ms.as_ref())
                .map(|v| v.span());
            let default_note = if raw.timeout_ms.is_none() {
                " (the default)"
            } else {
                ""
            };
            return Err(self.invalid(
                span.as_ref(),
                "heartbeat.timeout_ms",
                format!(
                    "timeout {}{default_note} must be longer than interval {}",
                    fmt_duration(timeout),
                    fmt_duration(interval)
                ),
            ));
        }
        // Unset, it is 30 s, and at least twice the timeout.
        let ack_timeout = value(
            &raw.ack_timeout_ms,
            "heartbeat.ack_timeout_ms",
            DEFAULT_ACK_TIMEOUT.max(timeout * 2),
        )?;
        if ack_timeout <= timeout {
            let span = raw
                .ack_timeout_ms
                .as_ref()
                .or(raw.timeout_ms.as_ref())
                .map(|v| v.span());
            return Err(self.invalid(
                span.as_ref(),
                "heartbeat.ack_timeout_ms",
                format!(
                    "ack timeout {} must be longer than timeout {}",
                    fmt_duration(ack_timeout),
                    fmt_duration(timeout)
                ),
            ));
        }
        Ok(HeartbeatConfig {
            interval,
            timeout,
            ack_timeout,
        })
    }

    fn convert_failover(&self, raw: Option<RawFailover>) -> Result<FailoverConfig, ConfigError> {
        let Some(raw) = raw else {
            return Ok(FailoverConfig::default());
        };
        let after_split_brain = match raw.after_split_brain {
            None => AfterSplitBrain::default(),
            Some(v) => v.get_ref().parse().map_err(|e: ValueError| {
                self.invalid(Some(&v.span()), "failover.after_split_brain", e.0)
            })?,
        };
        Ok(FailoverConfig {
            auto_promote: raw.auto_promote.unwrap_or(false),
            after_split_brain,
        })
    }

    fn convert_sync(&self, raw: Option<RawSync>) -> Result<SyncConfig, ConfigError> {
        let Some(raw) = raw else {
            return Ok(SyncConfig::default());
        };
        let mut sync = SyncConfig::default();
        if let Some(al) = raw.al_extents {
            let max = crate::meta::ACTIVITY_MAX;
            match usize::try_from(*al.get_ref()) {
                Ok(n) if (1..=max).contains(&n) => sync.al_extents = n,
                _ => {
                    return Err(self.invalid(
                        Some(&al.span()),
                        "sync.al_extents",
                        format!("{} is out of range (1 to {max})", al.get_ref()),
                    ))
                }
            }
        }
        let Some(rate) = raw.rate_mb_s else {
            return Ok(sync);
        };
        let max = u64::MAX / BYTES_PER_MB;
        if *rate.get_ref() > max {
            return Err(self.invalid(
                Some(&rate.span()),
                "sync.rate_mb_s",
                format!(
                    "{} is too large (maximum {max}; 0 = unlimited)",
                    rate.get_ref()
                ),
            ));
        }
        sync.rate_mb_s = rate.into_inner();
        Ok(sync)
    }

    fn convert_handlers(&self, raw: Option<RawHandlers>) -> Result<HandlersConfig, ConfigError> {
        let Some(raw) = raw else {
            return Ok(HandlersConfig::default());
        };
        let command = |v: Option<Spanned<String>>,
                       key: &str|
         -> Result<Option<String>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            if v.get_ref().contains('\0') {
                return Err(self.invalid(Some(&v.span()), key, "must not contain NUL characters"));
            }
            let cmd = v.into_inner();
            Ok(if cmd.trim().is_empty() {
                None
            } else {
                Some(cmd)
            })
        };
        Ok(HandlersConfig {
            on_promote: command(raw.on_promote, "handlers.on_promote")?,
            on_demote: command(raw.on_demote, "handlers.on_demote")?,
            on_split_brain: command(raw.on_split_brain, "handlers.on_split_brain")?,
            on_peer_lost: command(raw.on_peer_lost, "handlers.on_peer_lost")?,
            on_disk_failure: command(raw.on_disk_failure, "handlers.on_disk_failure")?,
        })
    }

    fn convert_nodes(&self, raw: Vec<Spanned<RawNode>>) -> Result<Vec<NodeConfig>, ConfigError> {
        if raw.is_empty() {
            return Err(self.invalid(
                None,
                "node",
                "at least one [[node]] table is required (two for a replicated pair)",
            ));
        }
        if raw.len() > MAX_NODES {
            return Err(self.invalid(
                Some(&raw[MAX_NODES].span()),
                "node",
                format!(
                    "{} nodes defined; a resource has one node (standalone) or two (a pair)",
                    raw.len()
                ),
            ));
        }
        let pair = raw.len() == 2;
        let mut nodes: Vec<NodeConfig> = Vec::with_capacity(raw.len());
        let mut names: HashMap<String, usize> = HashMap::new();

        for (index, node) in raw.into_iter().enumerate() {
            let span = node.span();
            let node = node.into_inner();

            let name = self.required(node.name, &span, &node_key(index, None, "name"))?;
            check_name(name.get_ref())
                .map_err(|m| self.invalid(Some(&name.span()), node_key(index, None, "name"), m))?;
            if let Some(first) = names.get(name.get_ref()) {
                return Err(self.invalid(
                    Some(&name.span()),
                    node_key(index, None, "name"),
                    format!(
                        "duplicate node name {:?} (also used by node[{first}]); node names must be unique",
                        name.get_ref()
                    ),
                ));
            }
            names.insert(name.get_ref().clone(), index);
            let key = |field: &str| node_key(index, Some(name.get_ref()), field);

            let disk = self.required(node.disk, &span, &key("disk"))?;
            let disk_path = check_abs_path(disk.get_ref())
                .map_err(|m| self.invalid(Some(&disk.span()), key("disk"), m))?;

            let meta = self.required(node.meta, &span, &key("meta"))?;
            let meta_spec: MetaSpec = meta
                .get_ref()
                .parse()
                .map_err(|e: ValueError| self.invalid(Some(&meta.span()), key("meta"), e.0))?;
            if meta_spec == MetaSpec::External(disk_path.clone()) {
                return Err(self.invalid(
                    Some(&meta.span()),
                    key("meta"),
                    "is the same file as disk; use meta = \"internal\" to keep metadata on the disk",
                ));
            }

            let replication = self.required(node.replication, &span, &key("replication"))?;
            let replication_addr = socket_addr(replication.get_ref(), "10.0.0.1:7789")
                .map_err(|e| self.invalid(Some(&replication.span()), key("replication"), e))?;
            if pair && replication_addr.port() == 0 {
                return Err(self.invalid(
                    Some(&replication.span()),
                    key("replication"),
                    "port must not be 0: the peer connects to this address",
                ));
            }
            if pair && replication_addr.ip().is_unspecified() {
                return Err(self.invalid(
                    Some(&replication.span()),
                    key("replication"),
                    format!(
                        "{replication_addr} is an unspecified address; give this node's own IP \
                         address, the peer connects to it"
                    ),
                ));
            }

            let nbd = self.required(node.nbd, &span, &key("nbd"))?;
            let nbd_addr: NbdAddr = nbd
                .get_ref()
                .parse()
                .map_err(|e: ValueError| self.invalid(Some(&nbd.span()), key("nbd"), e.0))?;

            let admin = self.required(node.admin, &span, &key("admin"))?;
            let admin_path = check_abs_path(admin.get_ref())
                .and_then(|p| check_socket_path_len(&p).map(|()| p))
                .map_err(|m| self.invalid(Some(&admin.span()), key("admin"), m))?;

            if let Some(other) = nodes.iter().find(|n| n.replication == replication_addr) {
                return Err(self.invalid(
                    Some(&replication.span()),
                    key("replication"),
                    format!(
                        "{replication_addr} is also the replication address of node {:?}; \
                         each node needs its own",
                        other.name
                    ),
                ));
            }

            let disk_faults = match node.disk_faults {
                None => None,
                Some(f) => Some(
                    f.get_ref()
                        .parse::<crate::storage::FaultSpec>()
                        .map_err(|m| self.invalid(Some(&f.span()), key("disk_faults"), m))?,
                ),
            };

            nodes.push(NodeConfig {
                name: name.into_inner(),
                disk: disk_path,
                meta: meta_spec,
                replication: replication_addr,
                nbd: nbd_addr,
                admin: admin_path,
                disk_faults,
            });
        }
        Ok(nodes)
    }
}

/// Converts a heartbeat value: integer milliseconds or a duration string.
fn duration_value(value: &toml::Value) -> Result<Duration, String> {
    match value {
        toml::Value::Integer(ms) => match u64::try_from(*ms) {
            Ok(ms) => Ok(Duration::from_millis(ms)),
            Err(_) => Err(format!("must be greater than 0 (got {ms})")),
        },
        toml::Value::String(s) => parse_duration(s).map_err(|e| e.0),
        other => Err(format!(
            "expected integer milliseconds or a duration string such as \"1.5s\", found {}",
            other.type_str()
        )),
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{d:?}")
    }
}

/// Validates a resource or node name.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_string());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{name:?} is {} bytes long; the maximum is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{name:?} contains {c:?}; allowed characters are A-Z, a-z, 0-9, '_', '.' and '-'"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid name"));
    }
    Ok(())
}

/// Validates an absolute path value.
fn check_abs_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("must not be empty".to_string());
    }
    if s.contains('\0') {
        return Err("must not contain NUL characters".to_string());
    }
    let path = PathBuf::from(s);
    if !path.is_absolute() {
        return Err(format!("{s:?} is not an absolute path"));
    }
    Ok(path)
}

fn check_socket_path_len(path: &Path) -> Result<(), String> {
    let len = path.as_os_str().len();
    if len >= SUN_PATH_LEN {
        return Err(format!(
            "unix socket path {} is {len} bytes long; the maximum is {}",
            path.display(),
            SUN_PATH_LEN - 1
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Source positions (for error messages)
// ---------------------------------------------------------------------------

/// 1-based line and character column of byte `offset` in `src`.
fn location(src: &str, offset: usize) -> Location {
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Location {
        line: before.matches('\n').count() + 1,
        col: before[line_start..].chars().count() + 1,
    }
}

/// The table a byte offset falls into, as recovered from the headers above it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TableContext {
    Root,
    Table(String),
    ArrayItem(String, usize),
}

impl TableContext {
    /// "in [heartbeat]", "in node[1]" or "at the top level".
    fn describe(&self) -> String {
        match self {
            TableContext::Root => "at the top level".to_string(),
            TableContext::Table(name) => format!("in [{name}]"),
            TableContext::ArrayItem(name, index) => format!("in {name}[{index}]"),
        }
    }

    fn key_path(&self, key: &str) -> String {
        match self {
            TableContext::Root => key.to_string(),
            TableContext::Table(name) => format!("{name}.{key}"),
            TableContext::ArrayItem(name, index) => format!("{name}[{index}].{key}"),
        }
    }
}

enum Header {
    Table(String),
    Array(String),
}

/// Recognizes a `[table]` or `[[array]]` header line.
fn parse_header(line: &str) -> Option<Header> {
    let t = line.trim();
    let (inner, rest, array) = if let Some(body) = t.strip_prefix("[[") {
        let end = body.find("]]")?;
        (&body[..end], &body[end + 2..], true)
    } else {
        let body = t.strip_prefix('[')?;
        let end = body.find(']')?;
        (&body[..end], &body[end + 1..], false)
    };
    let rest = rest.trim_start();
    if !(rest.is_empty() || rest.starts_with('#')) {
        return None;
    }
    if !inner.chars().all(|c| {
        c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"' | '\'' | ' ' | '\t')
    }) {
        return None;
    }
    let name: String = inner
        .chars()
        .filter(|c| !matches!(c, '"' | '\'' | ' ' | '\t'))
        .collect();
    if name.is_empty() {
        return None;
    }
    Some(if array {
        Header::Array(name)
    } else {
        Header::Table(name)
    })
}

/// Best-effort: which table contains byte `offset`. Skips lines inside
/// multi-line strings.
fn table_context(src: &str, offset: usize) -> TableContext {
    let mut context = TableContext::Root;
    let mut array_counts: HashMap<String, usize> = HashMap::new();
    let mut open_quote: Option<&str> = None;
    let mut pos = 0;
    for line in src.split_inclusive('\n') {
        if pos > offset {
            break;
        }
        let line_start = pos;
        pos += line.len();
        if open_quote.is_none() && (line_start..pos).contains(&offset) {
            // The offset is inside this line's header (e.g. an unknown table
            // name): the relevant context is the header's parent table.
            if let Some(Header::Table(name) | Header::Array(name)) = parse_header(line) {
                return match name.rsplit_once('.') {
                    Some((parent, _)) => TableContext::Table(parent.to_string()),
                    None => TableContext::Root,
                };
            }
        }
        if open_quote.is_none() {
            match parse_header(line) {
                Some(Header::Table(name)) => {
                    context = TableContext::Table(name);
                    continue;
                }
                Some(Header::Array(name)) => {
                    let count = array_counts.entry(name.clone()).or_insert(0);
                    context = TableContext::ArrayItem(name, *count);
                    *count += 1;
                    continue;
                }
                None => {}
            }
        }
        open_quote = track_multiline_strings(line, open_quote);
    }
    context
}

fn track_multiline_strings<'q>(line: &str, mut open: Option<&'q str>) -> Option<&'q str> {
    const QUOTES: [&str; 2] = ["\"\"\"", "'''"];
    let mut rest = line;
    loop {
        match open {
            Some(q) => match rest.find(q) {
                Some(i) => {
                    rest = &rest[i + q.len()..];
                    open = None;
                }
                None => return open,
            },
            None => {
                let next = QUOTES
                    .iter()
                    .filter_map(|q| rest.find(q).map(|i| (i, *q)))
                    .min_by_key(|(i, _)| *i);
                match next {
                    Some((i, q)) => {
                        rest = &rest[i + q.len()..];
                        open = Some(q);
                    }
                    None => return None,
                }
            }
        }
    }
}

/// Best-effort: the key whose value starts at byte `offset` (`key = value`
/// on the same line), without quotes or spaces.
fn key_at(src: &str, offset: usize) -> Option<String> {
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line = &before[before.rfind('\n').map_or(0, |i| i + 1)..];
    let left = &line[..line.rfind('=')?];
    let segment = left.rsplit(['{', ',']).next().unwrap_or(left).trim();
    if segment.is_empty()
        || !segment
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"' | '\'' | ' '))
    {
        return None;
    }
    Some(
        segment
            .chars()
            .filter(|c| !matches!(c, '"' | '\'' | ' '))
            .collect(),
    )
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");

    fn fixture_text(rel: &str) -> String {
        let path = format!("{FIXTURES}/{rel}");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
    }

    fn parse_fixture(rel: &str) -> Result<Config, ConfigError> {
        let origin = rel.rsplit('/').next().unwrap_or(rel);
        Config::parse_str(&fixture_text(rel), origin)
    }

    fn good(rel: &str) -> Config {
        parse_fixture(rel).unwrap_or_else(|e| panic!("{rel} should parse: {e}"))
    }

    fn bad(rel: &str) -> ConfigError {
        match parse_fixture(rel) {
            Ok(c) => panic!("{rel} should be rejected, parsed as {c:?}"),
            Err(e) => e,
        }
    }

    fn toml_files(dir: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
            .map(|entry| entry.expect("directory entry").file_name())
            .filter_map(|n| n.into_string().ok())
            .filter(|n| n.ends_with(".toml"))
            .collect();
        names.sort();
        names
    }

    fn node_toml(name: &str, disk: &str, meta: &str, replication: &str) -> String {
        format!(
            "[[node]]\nname = \"{name}\"\ndisk = \"{disk}\"\nmeta = \"{meta}\"\n\
             replication = \"{replication}\"\nnbd = \"127.0.0.1:10809\"\n\
             admin = \"/run/twinbd/t-{name}.sock\"\n"
        )
    }

    fn with_nodes(nodes: &[String]) -> String {
        format!(
            "[resource]\nname = \"t\"\nsecret = \"x\"\n\n{}",
            nodes.join("\n")
        )
    }

    fn pair_text(disk_a: &str, meta_a: &str, disk_b: &str, meta_b: &str) -> String {
        with_nodes(&[
            node_toml("alpha", disk_a, meta_a, "127.0.0.1:7789"),
            node_toml("beta", disk_b, meta_b, "127.0.0.1:7790"),
        ])
    }

    fn invalid_key(err: &ConfigError) -> &str {
        match err {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("expected ConfigError::Invalid, got {other:?}"),
        }
    }

    // -- good fixtures ------------------------------------------------------

    #[test]
    fn r0_full_example() {
        let c = good("r0.toml");
        assert_eq!(c.resource.name, "r0");
        assert_eq!(c.resource.protocol, Protocol::C);
        assert_eq!(c.resource.secret, "s3cret");
        assert_eq!(c.heartbeat.interval, Duration::from_millis(200));
        assert_eq!(c.heartbeat.timeout, Duration::from_millis(1000));
        assert!(!c.failover.auto_promote);
        assert_eq!(c.failover.after_split_brain, AfterSplitBrain::Disconnect);
        assert_eq!(c.sync.rate_mb_s, 0);
        assert_eq!(c.sync.rate_bytes_per_s(), None);
        assert_eq!(c.handlers.on_promote, None);
        assert_eq!(c.handlers.on_demote, None);
        assert_eq!(
            c.handlers.on_split_brain.as_deref(),
            Some("logger -t twinbd 'split brain on r0'")
        );
        assert_eq!(c.handlers.on_peer_lost, None);
        assert_eq!(c.path, None);
        assert_eq!(c.node_names(), ["alpha", "beta"]);

        let alpha = &c.nodes[0];
        assert_eq!(alpha.name, "alpha");
        assert_eq!(alpha.disk, PathBuf::from("/var/lib/twinbd/r0.img"));
        assert_eq!(
            alpha.meta,
            MetaSpec::External(PathBuf::from("/var/lib/twinbd/r0.meta"))
        );
        assert_eq!(alpha.replication, "10.0.0.1:7789".parse().expect("addr"));
        assert_eq!(
            alpha.nbd,
            NbdAddr::Tcp("0.0.0.0:10809".parse().expect("addr"))
        );
        assert_eq!(alpha.nbd.to_string(), "0.0.0.0:10809");
        assert_eq!(alpha.admin, PathBuf::from("/run/twinbd/r0-alpha.sock"));

        let beta = &c.nodes[1];
        assert_eq!(beta.name, "beta");
        assert_eq!(beta.replication, "10.0.0.2:7789".parse().expect("addr"));
        assert_eq!(beta.admin, PathBuf::from("/run/twinbd/r0-beta.sock"));
    }

    #[test]
    fn minimal_uses_defaults() {
        let c = good("minimal.toml");
        assert_eq!(c.resource.name, "minimal");
        assert_eq!(c.resource.protocol, Protocol::C);
        assert_eq!(c.heartbeat, HeartbeatConfig::default());
        assert_eq!(c.heartbeat.interval, Duration::from_millis(200));
        assert_eq!(c.heartbeat.timeout, Duration::from_millis(1000));
        assert_eq!(c.failover, FailoverConfig::default());
        assert!(!c.failover.auto_promote);
        assert_eq!(c.failover.after_split_brain, AfterSplitBrain::Disconnect);
        assert_eq!(c.sync, SyncConfig::default());
        assert_eq!(c.sync.al_extents, 479);
        assert_eq!(c.handlers, HandlersConfig::default());
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.nodes[0].disk, PathBuf::from("/dev/vdb"));
    }

    #[test]
    fn internal_meta_example() {
        let c = good("internal-meta.toml");
        assert_eq!(c.resource.name, "db-vol.1");
        assert_eq!(c.resource.protocol, Protocol::A);
        assert_eq!(c.resource.secret, "another secret with spaces");
        assert_eq!(c.heartbeat.interval, Duration::from_millis(250));
        assert_eq!(c.heartbeat.timeout, Duration::from_millis(1500));
        assert!(c.failover.auto_promote);
        assert_eq!(
            c.failover.after_split_brain,
            AfterSplitBrain::DiscardYoungerPrimary
        );
        assert_eq!(c.sync.rate_mb_s, 100);
        assert_eq!(c.sync.rate_bytes_per_s(), Some(100 * 1024 * 1024));
        assert_eq!(c.sync.al_extents, 128);
        assert_eq!(
            c.handlers.on_promote.as_deref(),
            Some("/usr/local/bin/mount-db.sh")
        );
        assert_eq!(c.handlers.on_peer_lost, None, "blank command means none");
        for node in &c.nodes {
            assert_eq!(node.meta, MetaSpec::Internal);
            assert_eq!(
                node.nbd,
                NbdAddr::Unix(PathBuf::from("/run/twinbd/db-vol.1.nbd"))
            );
            assert_eq!(node.nbd.to_string(), "unix:/run/twinbd/db-vol.1.nbd");
        }
        let a = &c.nodes[0];
        assert_eq!(a.name, "node-a");
        assert_eq!(
            a.replication,
            SocketAddr::new(
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xa)),
                7789
            )
        );
        assert_eq!(a.replication.to_string(), "[fd00::a]:7789");
    }

    #[test]
    fn debug_output_redacts_the_secret() {
        let c = good("r0.toml");
        let text = format!("{c:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }

    #[test]
    fn standalone_example() {
        let c = good("standalone.toml");
        assert_eq!(c.nodes.len(), 1);
        assert_eq!(c.resource.protocol, Protocol::B);
        assert_eq!(c.heartbeat.interval, Duration::from_secs(1));
        assert_eq!(c.heartbeat.timeout, Duration::from_secs(120));
        assert_eq!(
            c.failover.after_split_brain,
            AfterSplitBrain::DiscardLeastChanges
        );
        assert_eq!(c.nodes[0].nbd.to_string(), "[::1]:10809");
        assert!(c.peer_of("solo").is_none());
    }

    #[test]
    fn every_good_fixture_parses() {
        let names = toml_files(FIXTURES);
        assert!(names.len() >= 4, "fixtures missing: {names:?}");
        for name in names {
            good(&name);
        }
    }

    // -- bad fixtures -------------------------------------------------------

    /// (file, expected key for `Invalid` or `None` for `Parse`, substrings
    /// the message must contain, expected line).
    type BadCase = (
        &'static str,
        Option<&'static str>,
        &'static [&'static str],
        Option<usize>,
    );

    const BAD: &[BadCase] = &[
        (
            "bad-address.toml",
            Some("node \"beta\".replication"),
            &["beta.example.com:77890", "invalid port"],
            Some(18),
        ),
        (
            "bad-duration.toml",
            Some("heartbeat.interval_ms"),
            &["\"5 parsecs\"", "unknown unit"],
            Some(7),
        ),
        (
            "bad-meta.toml",
            Some("node \"alpha\".meta"),
            &["not an absolute path", "internal"],
            Some(9),
        ),
        (
            "bad-name.toml",
            Some("resource.name"),
            &["\"r 0\"", "allowed characters"],
            Some(3),
        ),
        (
            "bad-nbd.toml",
            Some("node \"alpha\".nbd"),
            &["run/twinbd/r0.nbd", "unix:/absolute/path"],
            Some(11),
        ),
        (
            "bad-protocol.toml",
            Some("resource.protocol"),
            &["\"D\"", "\"A\", \"B\" or \"C\""],
            Some(5),
        ),
        (
            "bad-split-brain.toml",
            Some("failover.after_split_brain"),
            &["discard-everything", "discard-least-changes"],
            Some(7),
        ),
        (
            "bad-al-extents.toml",
            Some("sync.al_extents"),
            &["1000 is out of range (1 to 479)"],
            Some(6),
        ),
        (
            "bad-timeout.toml",
            Some("heartbeat.timeout_ms"),
            &["1000ms", "longer than interval 2000ms"],
            Some(8),
        ),
        (
            "duplicate-node-names.toml",
            Some("node[1].name"),
            &["duplicate node name \"alpha\""],
            Some(15),
        ),
        (
            "empty-secret.toml",
            Some("resource.secret"),
            &["must not be empty"],
            Some(4),
        ),
        (
            "missing-node-key.toml",
            Some("node \"beta\".admin"),
            &["missing required key"],
            Some(14),
        ),
        (
            "missing-secret.toml",
            Some("resource.secret"),
            &["missing required key"],
            Some(2),
        ),
        (
            "no-nodes.toml",
            Some("node"),
            &["at least one [[node]]"],
            None,
        ),
        (
            "relative-admin.toml",
            Some("node \"alpha\".admin"),
            &["r0-alpha.sock", "absolute"],
            Some(12),
        ),
        (
            "same-replication.toml",
            Some("node \"beta\".replication"),
            &["10.0.0.1:7789", "node \"alpha\""],
            Some(18),
        ),
        ("syntax-error.toml", None, &["string"], Some(3)),
        ("three-nodes.toml", Some("node"), &["3 nodes"], Some(22)),
        (
            "unknown-key.toml",
            None,
            &["unknown field `foo` in [heartbeat]", "`interval_ms`"],
            Some(7),
        ),
        (
            "unknown-node-key.toml",
            None,
            &["unknown field `disks` in node[1]", "`disk`"],
            Some(21),
        ),
        (
            "unknown-table.toml",
            None,
            &["unknown field `replication` at the top level", "`resource`"],
            Some(6),
        ),
        ("wrong-type.toml", None, &["sync.rate_mb_s", "-5"], Some(7)),
        (
            "zero-interval.toml",
            Some("heartbeat.interval_ms"),
            &["greater than 0"],
            Some(7),
        ),
    ];

    #[test]
    fn bad_fixtures_are_rejected_with_expected_errors() {
        for &(file, key, needles, line) in BAD {
            let err = bad(&format!("bad/{file}"));
            let text = err.to_string();
            assert!(!text.contains('\n'), "{file}: multi-line message: {text}");
            assert!(
                text.starts_with(&format!("{file}:")),
                "{file}: message must start with the origin: {text}"
            );
            match (&err, key) {
                (ConfigError::Invalid { key: got, at, .. }, Some(want)) => {
                    assert_eq!(got, want, "{file}: {text}");
                    assert_eq!(at.map(|l| l.line), line, "{file}: {text}");
                    assert!(text.contains(&format!(": {want}: ")), "{file}: {text}");
                }
                (ConfigError::Parse { line: got, .. }, None) => {
                    assert_eq!(Some(*got), line, "{file}: {text}");
                }
                _ => panic!("{file}: unexpected error kind: {err:?}"),
            }
            for needle in needles {
                assert!(text.contains(needle), "{file}: {text:?} lacks {needle:?}");
            }
        }
    }

    #[test]
    fn every_bad_fixture_is_covered() {
        let names = toml_files(&format!("{FIXTURES}/bad"));
        for name in &names {
            assert!(
                BAD.iter().any(|(file, ..)| file == name),
                "fixtures/bad/{name} has no expectation in BAD"
            );
            bad(&format!("bad/{name}"));
        }
        assert_eq!(names.len(), BAD.len(), "BAD lists a missing fixture");
    }

    #[test]
    fn unknown_key_error_format() {
        let err = bad("bad/unknown-key.toml");
        assert_eq!(
            err.to_string(),
            "unknown-key.toml:7:1: unknown field `foo` in [heartbeat], \
             expected one of `interval_ms`, `timeout_ms`, `ack_timeout_ms`"
        );
        match err {
            ConfigError::Parse {
                origin, line, col, ..
            } => {
                assert_eq!((origin.as_str(), line, col), ("unknown-key.toml", 7, 1));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unknown_keys_in_every_table() {
        for (table, line) in [
            (
                "[resource]\nname = \"t\"\nsecret = \"x\"\nsecrte = \"y\"\n",
                4,
            ),
            (
                "[resource]\nname = \"t\"\nsecret = \"x\"\n[failover]\nauto = true\n",
                5,
            ),
            (
                "[resource]\nname = \"t\"\nsecret = \"x\"\n[sync]\nrate = 1\n",
                5,
            ),
            (
                "[resource]\nname = \"t\"\nsecret = \"x\"\n[handlers]\non_start = \"\"\n",
                5,
            ),
            ("bogus = 1\n[resource]\nname = \"t\"\nsecret = \"x\"\n", 1),
        ] {
            let src = format!(
                "{table}\n{}",
                node_toml("a", "/d", "internal", "127.0.0.1:1")
            );
            match Config::parse_str(&src, "t.toml") {
                Err(ConfigError::Parse {
                    line: got, message, ..
                }) => {
                    assert_eq!(got, line, "{message}");
                    assert!(message.starts_with("unknown field `"), "{message}");
                }
                other => panic!("expected unknown-field error for {table:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn type_errors_name_the_key() {
        let src = "[resource]\nname = \"t\"\nsecret = \"x\"\n[failover]\nauto_promote = \"yes\"\n";
        let err = Config::parse_str(src, "t.toml").expect_err("must fail");
        let text = err.to_string();
        assert!(
            text.starts_with("t.toml:5:16: failover.auto_promote: invalid type"),
            "{text}"
        );

        let src = "[resource]\nname = 5\nsecret = \"x\"\n";
        let text = Config::parse_str(src, "t.toml")
            .expect_err("must fail")
            .to_string();
        assert!(
            text.starts_with("t.toml:2:8: resource.name: invalid type"),
            "{text}"
        );

        let src = "[resource]\nname = \"t\"\nsecret = \"x\"\n[node]\nname = \"a\"\n";
        let text = Config::parse_str(src, "t.toml")
            .expect_err("must fail")
            .to_string();
        assert!(text.contains("expected a sequence"), "{text}");
    }

    #[test]
    fn missing_resource_table() {
        let src = node_toml("a", "/d", "internal", "127.0.0.1:1");
        let err = Config::parse_str(&src, "t.toml").expect_err("must fail");
        assert_eq!(invalid_key(&err), "resource");
        assert!(err.to_string().contains("[resource]"));
    }

    #[test]
    fn missing_required_keys_are_named() {
        let full = node_toml("a", "/d", "internal", "127.0.0.1:1");
        for field in ["name", "disk", "meta", "replication", "nbd", "admin"] {
            let node: String = full
                .lines()
                .filter(|l| !l.starts_with(&format!("{field} =")))
                .map(|l| format!("{l}\n"))
                .collect();
            let err = Config::parse_str(&with_nodes(&[node]), "t.toml").expect_err(field);
            let want = if field == "name" {
                "node[0].name".to_string()
            } else {
                format!("node \"a\".{field}")
            };
            assert_eq!(invalid_key(&err), want);
            assert!(err.to_string().contains("missing required key"), "{err}");
        }
        let err = Config::parse_str("[resource]\nsecret = \"x\"\n", "t.toml").expect_err("name");
        assert_eq!(invalid_key(&err), "resource.name");
    }

    // -- values -------------------------------------------------------------

    #[test]
    fn duration_strings() {
        let ok = [
            ("200ms", Duration::from_millis(200)),
            ("1s", Duration::from_secs(1)),
            ("1.5s", Duration::from_millis(1500)),
            ("2m", Duration::from_secs(120)),
            ("2min", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("750us", Duration::from_micros(750)),
            (" 3 s ", Duration::from_secs(3)),
            (".25s", Duration::from_millis(250)),
            ("0.001s", Duration::from_millis(1)),
            ("0ms", Duration::ZERO),
        ];
        for (s, want) in ok {
            assert_eq!(parse_duration(s), Ok(want), "{s:?}");
        }
        for s in [
            "",
            "ms",
            "200",
            "1.2.3s",
            "5 parsecs",
            "-1s",
            "1e3ms",
            ".s",
            "99999999999999999999999h",
        ] {
            assert!(parse_duration(s).is_err(), "{s:?} should be rejected");
        }
    }

    fn heartbeat(interval: &str, timeout: &str) -> Result<HeartbeatConfig, ConfigError> {
        let src = format!(
            "[resource]\nname = \"t\"\nsecret = \"x\"\n[heartbeat]\ninterval_ms = {interval}\n\
             timeout_ms = {timeout}\n{}",
            node_toml("a", "/d", "internal", "127.0.0.1:1")
        );
        Config::parse_str(&src, "t.toml").map(|c| c.heartbeat)
    }

    #[test]
    fn ack_timeout_defaults_parses_and_outlasts_the_timeout() {
        let hb = heartbeat("100", "1000").expect("valid");
        assert_eq!(hb.ack_timeout, DEFAULT_ACK_TIMEOUT);
        let hb = heartbeat("100", "1000\nack_timeout_ms = \"5s\"").expect("valid");
        assert_eq!(hb.ack_timeout, Duration::from_secs(5));
        let err = heartbeat("100", "1000\nack_timeout_ms = 1000")
            .expect_err("not longer than the timeout")
            .to_string();
        assert!(
            err.contains("heartbeat.ack_timeout_ms") && err.contains("longer than timeout"),
            "{err}"
        );
        // Unset, it stays above a long timeout.
        let hb = heartbeat("100", "\"40s\"").expect("valid");
        assert_eq!(hb.ack_timeout, Duration::from_secs(80));
    }

    #[test]
    fn heartbeat_integers_and_strings() {
        let hb = heartbeat("100", "\"1.5s\"").expect("valid");
        assert_eq!(hb.interval, Duration::from_millis(100));
        assert_eq!(hb.timeout, Duration::from_millis(1500));
        assert_eq!(
            heartbeat("\"100ms\"", "300").expect("valid").timeout,
            Duration::from_millis(300)
        );

        for (interval, timeout, key, needle) in [
            ("0", "1000", "heartbeat.interval_ms", "greater than 0"),
            ("-5", "1000", "heartbeat.interval_ms", "greater than 0"),
            ("200", "\"0s\"", "heartbeat.timeout_ms", "greater than 0"),
            ("1.5", "1000", "heartbeat.interval_ms", "found float"),
            ("true", "1000", "heartbeat.interval_ms", "found boolean"),
            ("500", "500", "heartbeat.timeout_ms", "longer than interval"),
            (
                "\"2s\"",
                "\"1s\"",
                "heartbeat.timeout_ms",
                "longer than interval",
            ),
            (
                "200",
                "\"soon\"",
                "heartbeat.timeout_ms",
                "invalid duration",
            ),
        ] {
            let err = heartbeat(interval, timeout).expect_err(interval);
            assert_eq!(invalid_key(&err), key, "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
    }

    #[test]
    fn default_timeout_must_exceed_interval() {
        let src = format!(
            "[resource]\nname = \"t\"\nsecret = \"x\"\n[heartbeat]\ninterval_ms = \"2s\"\n{}",
            node_toml("a", "/d", "internal", "127.0.0.1:1")
        );
        let err = Config::parse_str(&src, "t.toml").expect_err("must fail");
        assert_eq!(invalid_key(&err), "heartbeat.timeout_ms");
        assert!(err.to_string().contains("(the default)"), "{err}");
    }

    #[test]
    fn enums_round_trip() {
        for p in [Protocol::A, Protocol::B, Protocol::C] {
            assert_eq!(p.to_string().parse::<Protocol>(), Ok(p));
        }
        assert_eq!("c".parse::<Protocol>(), Ok(Protocol::C));
        assert!("AB".parse::<Protocol>().is_err());
        for a in [
            AfterSplitBrain::Disconnect,
            AfterSplitBrain::DiscardYoungerPrimary,
            AfterSplitBrain::DiscardLeastChanges,
        ] {
            assert_eq!(a.to_string().parse::<AfterSplitBrain>(), Ok(a));
        }
        assert_eq!("internal".parse::<MetaSpec>(), Ok(MetaSpec::Internal));
        assert_eq!(MetaSpec::External("/m".into()).to_string(), "/m");
        assert!("m".parse::<MetaSpec>().is_err());
    }

    #[test]
    fn nbd_addresses() {
        let unix: NbdAddr = "unix:/run/twinbd/r0.nbd".parse().expect("unix");
        assert_eq!(unix, NbdAddr::Unix(PathBuf::from("/run/twinbd/r0.nbd")));
        assert_eq!(unix.to_string(), "unix:/run/twinbd/r0.nbd");

        let v6: NbdAddr = "[::1]:10809".parse().expect("ipv6");
        assert_eq!(
            v6,
            NbdAddr::Tcp(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 10809))
        );
        assert_eq!(v6.to_string(), "[::1]:10809");
        let v4: NbdAddr = "127.0.0.1:10809".parse().expect("ipv4");
        assert_eq!(
            v4,
            NbdAddr::Tcp(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10809))
        );

        // A host name is resolved when the file is read, refused by pure parsing.
        assert!("localhost:10809".parse::<NbdAddr>().is_err());
        let named: NbdAddr = resolving_names(|| "localhost:10809".parse()).expect("a host name");
        assert!(
            matches!(named, NbdAddr::Tcp(a) if a.ip().is_loopback() && a.port() == 10809),
            "localhost:10809 resolved to {named}"
        );
        let unknown = resolving_names(|| "no-such-host.invalid:10809".parse::<NbdAddr>())
            .expect_err("a name that does not resolve");
        assert!(unknown.0.contains("no-such-host.invalid"), "{}", unknown.0);

        for s in [
            "unix:",
            "unix:relative.sock",
            "localhost",
            "localhost:port",
            "local_host:10809",
            "10809",
            "::1:10809",
            "",
        ] {
            assert!(s.parse::<NbdAddr>().is_err(), "{s:?} should be rejected");
        }
        let long = format!("unix:/{}", "x".repeat(SUN_PATH_LEN));
        let err = long.parse::<NbdAddr>().expect_err("too long");
        assert!(err.to_string().contains("the maximum is 107"), "{err}");
        let fits = format!("unix:/{}", "x".repeat(SUN_PATH_LEN - 2));
        assert!(fits.parse::<NbdAddr>().is_ok());
    }

    #[test]
    fn admin_socket_path_length_is_checked() {
        let mut node = node_toml("a", "/d", "internal", "127.0.0.1:1");
        node = node.replace(
            "/run/twinbd/t-a.sock",
            &format!("/run/{}.sock", "s".repeat(120)),
        );
        let err = Config::parse_str(&with_nodes(&[node]), "t.toml").expect_err("long");
        assert_eq!(invalid_key(&err), "node \"a\".admin");
    }

    #[test]
    fn sync_rate() {
        let rate = |rate_mb_s| SyncConfig {
            rate_mb_s,
            ..SyncConfig::default()
        };
        assert_eq!(rate(0).rate_bytes_per_s(), None);
        assert_eq!(rate(1).rate_bytes_per_s(), Some(1 << 20));
        assert_eq!(rate(u64::MAX).rate_bytes_per_s(), Some(u64::MAX));
        let src = format!(
            "[resource]\nname = \"t\"\nsecret = \"x\"\n[sync]\nrate_mb_s = {}\n{}",
            u64::MAX / BYTES_PER_MB + 1,
            node_toml("a", "/d", "internal", "127.0.0.1:1")
        );
        let err = Config::parse_str(&src, "t.toml").expect_err("too large");
        assert_eq!(invalid_key(&err), "sync.rate_mb_s");
    }

    #[test]
    fn activity_log_size() {
        let parse = |v: &str| {
            let src = format!(
                "[resource]\nname = \"t\"\nsecret = \"x\"\n[sync]\nal_extents = {v}\n{}",
                node_toml("a", "/d", "internal", "127.0.0.1:1")
            );
            Config::parse_str(&src, "t.toml")
        };
        assert_eq!(parse("1").expect("1").sync.al_extents, 1);
        assert_eq!(parse("479").expect("479").sync.al_extents, 479);
        for bad in ["0", "480"] {
            let err = parse(bad).expect_err(bad);
            assert_eq!(invalid_key(&err), "sync.al_extents", "{bad}");
        }
        for bad in ["-1", "\"many\""] {
            let err = parse(bad).expect_err(bad).to_string();
            assert!(
                err.contains("sync.al_extents") && err.contains("t.toml:5:"),
                "{err}"
            );
        }
    }

    #[test]
    fn names_are_validated() {
        assert!(check_name(&"a".repeat(MAX_NAME_LEN)).is_ok());
        assert!(check_name(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(check_name("A-z_0.9").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "é", "r0\n"] {
            assert!(check_name(bad).is_err(), "{bad:?} should be rejected");
        }
        let node = node_toml("bad/name", "/d", "internal", "127.0.0.1:1");
        let err = Config::parse_str(&with_nodes(&[node]), "t.toml").expect_err("name");
        assert_eq!(invalid_key(&err), "node[0].name");
    }

    #[test]
    fn meta_must_differ_from_disk() {
        let node = node_toml("a", "/d", "/d", "127.0.0.1:1");
        let err = Config::parse_str(&with_nodes(&[node]), "t.toml").expect_err("same");
        assert_eq!(invalid_key(&err), "node \"a\".meta");
    }

    #[test]
    fn standalone_allows_wildcard_replication_but_pairs_do_not() {
        let solo = with_nodes(&[node_toml("a", "/d", "internal", "0.0.0.0:0")]);
        assert!(Config::parse_str(&solo, "t.toml").is_ok());

        for addr in ["0.0.0.0:7789", "[::]:7789", "10.0.0.1:0"] {
            let src = with_nodes(&[
                node_toml("a", "/d", "internal", addr),
                node_toml("b", "/d", "internal", "10.0.0.2:7789"),
            ]);
            let err = Config::parse_str(&src, "t.toml").expect_err(addr);
            assert_eq!(invalid_key(&err), "node \"a\".replication", "{err}");
        }
    }

    #[test]
    fn location_counts_characters() {
        let src = "a = \"é\"\nbé = 1";
        assert_eq!(location(src, 0), Location { line: 1, col: 1 });
        assert_eq!(
            location(src, src.find("= 1").expect("pos")),
            Location { line: 2, col: 4 }
        );
        assert_eq!(location(src, src.len() + 10), Location { line: 2, col: 7 });
        // Inside a multi-byte character: rounds down.
        assert_eq!(location(src, 6), Location { line: 1, col: 6 });
    }

    #[test]
    fn table_context_skips_multiline_strings() {
        let src = "[handlers]\non_promote = \"\"\"\n[fake]\n\"\"\"\nx = 1\n";
        let offset = src.find("x = 1").expect("pos");
        assert_eq!(
            table_context(src, offset),
            TableContext::Table("handlers".to_string())
        );
    }

    // -- node selection -----------------------------------------------------

    #[test]
    fn node_selection_by_name() {
        let c = good("r0.toml");
        assert_eq!(c.node(Some("alpha")).expect("alpha").name, "alpha");
        assert_eq!(c.node(Some("beta")).expect("beta").name, "beta");
        assert_eq!(c.peer_of("alpha").map(|n| n.name.as_str()), Some("beta"));
        assert_eq!(c.peer_of("beta").map(|n| n.name.as_str()), Some("alpha"));
        assert!(c.peer_of("gamma").is_none());

        let err = c.node(Some("gamma")).expect_err("no gamma");
        assert_eq!(
            err.to_string(),
            "no node named gamma in the configuration (nodes: alpha, beta)"
        );
        assert!(matches!(
            err,
            ConfigError::NoSuchNode { from_hostname: false, ref available, .. }
                if available == &["alpha", "beta"]
        ));
    }

    #[test]
    fn node_selection_by_hostname() {
        let mut c = good("r0.toml");
        c.path = Some(PathBuf::from("r0.toml"));
        assert_eq!(c.node_for_hostname("alpha").expect("exact").name, "alpha");
        assert_eq!(
            c.node_for_hostname("beta.example.com")
                .expect("short name")
                .name,
            "beta"
        );
        let err = c.node_for_hostname("gamma").expect_err("no gamma");
        assert_eq!(
            err.to_string(),
            "no node named gamma (this machine's hostname) in r0.toml; \
             pass -n NAME (nodes: alpha, beta)"
        );
        assert!(matches!(
            c.node_for_hostname(""),
            Err(ConfigError::Hostname { .. })
        ));
    }

    #[test]
    fn node_none_uses_this_machines_hostname() {
        let hostname = nix::unistd::gethostname()
            .expect("gethostname")
            .into_string()
            .expect("utf-8 hostname");
        let short = hostname.split('.').next().unwrap_or(&hostname).to_string();
        if check_name(&short).is_err() {
            return; // cannot be a node name; nothing meaningful to test here
        }
        let other = if short == "zz-other" {
            "zz-other2"
        } else {
            "zz-other"
        };
        let src = with_nodes(&[
            node_toml(other, "/d", "internal", "10.0.0.1:7789"),
            node_toml(&short, "/d", "internal", "10.0.0.2:7789"),
        ]);
        let c = Config::parse_str(&src, "t.toml").expect("valid");
        assert_eq!(c.node(None).expect("found by hostname").name, short);

        let src = with_nodes(&[node_toml(other, "/d", "internal", "10.0.0.1:7789")]);
        let c = Config::parse_str(&src, "t.toml").expect("valid");
        let err = c.node(None).expect_err("not found");
        let text = err.to_string();
        assert!(text.contains("(this machine's hostname)"), "{text}");
        assert!(text.contains("pass -n NAME"), "{text}");
        assert!(text.contains(&format!("(nodes: {other})")), "{text}");
    }

    // -- load() and file system checks --------------------------------------

    fn write_config(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("r0.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    #[test]
    fn load_checks_that_disks_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display().to_string();
        let disk_a = dir.path().join("a.img");
        std::fs::write(&disk_a, b"").expect("disk");
        let missing = format!("{d}/missing.img");
        let path = write_config(
            dir.path(),
            &pair_text(
                &disk_a.display().to_string(),
                &format!("{d}/a.meta"),
                &missing,
                "internal",
            ),
        );
        let err = Config::load(&path).expect_err("beta disk missing");
        assert_eq!(invalid_key(&err), "node \"beta\".disk");
        let text = err.to_string();
        assert_eq!(
            text,
            format!(
                "{}: node \"beta\".disk: {missing} does not exist",
                path.display()
            )
        );

        // read() does not look at the file system; validate_node_paths can
        // check just the local node.
        let c = Config::read(&path).expect("read");
        assert_eq!(c.path.as_deref(), Some(path.as_path()));
        c.validate_node_paths("alpha").expect("alpha is fine");
        assert!(c.validate_node_paths("beta").is_err());
        assert!(matches!(
            c.validate_node_paths("gamma"),
            Err(ConfigError::NoSuchNode { .. })
        ));
    }

    #[test]
    fn load_succeeds_with_existing_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = tempfile::NamedTempFile::new_in(dir.path()).expect("disk");
        let disk = disk.path().display().to_string();
        let meta = format!("{}/r0.meta", dir.path().display());
        let path = write_config(dir.path(), &pair_text(&disk, &meta, &disk, "internal"));
        let c = Config::load(&path).expect("load");
        assert_eq!(c.path.as_deref(), Some(path.as_path()));
        assert_eq!(c.nodes[0].meta, MetaSpec::External(PathBuf::from(&meta)));
        assert_eq!(
            c.node(Some("gamma")).expect_err("gamma").to_string(),
            format!(
                "no node named gamma in {} (nodes: alpha, beta)",
                path.display()
            )
        );
    }

    #[test]
    fn load_rejects_bad_disk_and_meta_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display().to_string();
        let disk = format!("{d}/disk.img");
        std::fs::write(&disk, b"").expect("disk");

        // Disk is a directory.
        let path = write_config(dir.path(), &pair_text(&d, "internal", &disk, "internal"));
        let err = Config::load(&path).expect_err("directory");
        assert_eq!(invalid_key(&err), "node \"alpha\".disk");
        assert!(err.to_string().contains("is a directory"), "{err}");

        // Metadata directory does not exist.
        let meta = format!("{d}/nowhere/r0.meta");
        let path = write_config(dir.path(), &pair_text(&disk, &meta, &disk, "internal"));
        let err = Config::load(&path).expect_err("meta dir");
        assert_eq!(invalid_key(&err), "node \"alpha\".meta");
        assert!(err.to_string().contains("does not exist"), "{err}");

        // Metadata path is a directory.
        let path = write_config(dir.path(), &pair_text(&disk, &d, &disk, "internal"));
        let err = Config::load(&path).expect_err("meta is dir");
        assert_eq!(invalid_key(&err), "node \"alpha\".meta");
    }

    #[test]
    fn load_reports_unreadable_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.toml");
        match Config::load(&path) {
            Err(ConfigError::Read { path: p, source }) => {
                assert_eq!(p, path);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected a read error, got {other:?}"),
        }
    }

    #[test]
    fn load_uses_path_as_origin_in_parse_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_config(dir.path(), &fixture_text("bad/unknown-key.toml"));
        let text = Config::load(&path).expect_err("bad").to_string();
        assert!(
            text.starts_with(&format!("{}:7:1: unknown field `foo`", path.display())),
            "{text}"
        );
    }
}
