//! The node daemon: metadata, data disk, NBD export and control socket, tied together.
//!
//! A node always starts secondary. `promote` opens the export (the NBD listener is always
//! bound; while secondary it refuses clients with a message saying so); `demote` closes it
//! after the clients have gone. Role changes are serialized by one async mutex and recorded
//! in the metadata before they take effect outwardly.

pub mod state;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, watch, Notify};

use crate::config::{Config, MetaSpec, NodeConfig};
use crate::control::{Event, Reply, Request};
use crate::meta::{self, DiskState, Flags, MetaLocation, MetaStore};
use crate::nbd::server::{self as nbd, Export, ExportState, Listener, ServerCtx};
use crate::peer::link::LinkParams;
use crate::repl::{DiskHealth, ReplEvent, ReplSettings, ReplicatedDisk, Replicator};
use crate::status::{Connection, DiskStatus, PeerStatus, Role, Stats, Status};
use crate::storage::{self, Backend, Disk, EngineChoice};
use state::{Decision, RoleView};

/// How long a handler may run before it is killed.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long shutdown and demotion wait for NBD clients to finish their requests.
const CLIENT_DRAIN: Duration = Duration::from_secs(30);
/// A running resync gets an `events` line once this long has passed since the last one,
/// progress or not; with the 250 ms checks of `watch_events`, no second passes without one.
const RESYNC_EVENT_EVERY: Duration = Duration::from_millis(700);

/// Where split-brain recovery files go when the disk's directory will not do.
const DEFAULT_RECOVERY_DIR: &str = "/var/lib/twinbd";

/// Where this node writes split-brain recovery files: beside an external metadata file; with
/// internal metadata, beside a disk that is a regular file, else (a block device, whose
/// directory is `/dev`, a file system in memory) in [`DEFAULT_RECOVERY_DIR`].
fn recovery_dir(meta: &MetaSpec, disk: &Path, disk_is_block: bool) -> PathBuf {
    let beside = match meta {
        MetaSpec::External(p) => p.parent(),
        MetaSpec::Internal if !disk_is_block => disk.parent(),
        MetaSpec::Internal => None,
    };
    beside.map_or_else(|| PathBuf::from(DEFAULT_RECOVERY_DIR), Path::to_path_buf)
}

fn disk_is_block(disk: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(disk).is_ok_and(|m| m.file_type().is_block_device())
}

/// Errors that stop the daemon or a command before it runs.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Meta(#[from] meta::MetaError),
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error("cannot listen for NBD clients on {addr}: {source}")]
    NbdBind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot listen for the peer on {addr}: {source}")]
    ReplBind {
        addr: String,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Admin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another twinbd daemon already answers on {0}")]
    AlreadyRunning(PathBuf),
    #[error("disk {path} has {actual} bytes but its metadata records {expected}: the disk shrank or is the wrong one")]
    DiskTooSmall {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("{0}")]
    Runtime(String),
}

/// Where this node's metadata lives.
pub fn meta_location(node: &NodeConfig) -> MetaLocation {
    match &node.meta {
        MetaSpec::Internal => MetaLocation::Internal {
            disk: node.disk.clone(),
        },
        MetaSpec::External(p) => MetaLocation::External(p.clone()),
    }
}

/// `create-md`: writes fresh metadata for the node's disk. Returns the exported size.
pub fn create_md(cfg: &Config, node: &NodeConfig, force: bool) -> Result<u64, NodeError> {
    // Holding the disk open keeps its lock: no daemon can start on it meanwhile, and a running
    // one makes this fail instead of having its metadata replaced under it.
    let (disk_size, _lock) = storage::disk_size(&node.disk)?;
    let granularity = crate::bitmap::DEFAULT_GRANULARITY;
    let data_size = match node.meta {
        MetaSpec::Internal => meta::internal_layout(disk_size, granularity)?.0,
        MetaSpec::External(_) => disk_size / 4096 * 4096,
    };
    let store = MetaStore::create(
        &meta_location(node),
        meta::CreateParams {
            resource: cfg.resource.name.clone(),
            node: node.name.clone(),
            data_size,
            granularity,
        },
        force,
    )?;
    Ok(store.data_size())
}

/// The role, readable without waiting on a role change. (The disk state lives in the
/// metadata, which replication updates too.)
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    role: Role,
}

pub struct Node {
    cfg: Config,
    me: NodeConfig,
    peer_name: String,
    meta: Arc<Mutex<MetaStore>>,
    disk: Arc<Disk>,
    repl: Option<Arc<Replicator>>,
    export: Arc<Export<ReplicatedDisk>>,
    export_tx: watch::Sender<ExportState<ReplicatedDisk>>,
    nbd: Arc<ServerCtx<ReplicatedDisk>>,
    snapshot: Mutex<Snapshot>,
    /// Serializes role changes.
    transition: tokio::sync::Mutex<()>,
    events: broadcast::Sender<String>,
    changed: Arc<Notify>,
    repl_events: Mutex<Option<mpsc::UnboundedReceiver<ReplEvent>>>,
    health: Arc<DiskHealth>,
    detail: Mutex<String>,
}

fn disk_status(d: DiskState) -> DiskStatus {
    match d {
        DiskState::UpToDate => DiskStatus::UpToDate,
        DiskState::Outdated => DiskStatus::Outdated,
        DiskState::Inconsistent => DiskStatus::Inconsistent,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Node {
    /// Opens metadata and disk; the node is secondary and its export closed.
    pub fn open(
        cfg: Config,
        node_name: &str,
        engine: EngineChoice,
    ) -> Result<Arc<Node>, NodeError> {
        let me = cfg.node(Some(node_name))?.clone();
        cfg.validate_node_paths(&me.name)?;
        let (mut store, report) = MetaStore::open(&meta_location(&me))?;
        for w in &report.warnings {
            tracing::warn!(meta = %store.location().path().display(), "{w}");
        }
        store.check_identity(&cfg.resource.name, &me.name)?;
        // Crash recovery: extents of the activity log may hold writes only one disk has.
        let clean = store.superblock().flags.contains(Flags::CLEAN_SHUTDOWN);
        let marked = crate::repl::activity::recover(&mut store, clean)?;
        if marked > 0 {
            tracing::warn!(
                bytes = marked,
                "unclean shutdown: {} of recently written extents marked out of sync for the next resync",
                crate::status::human_bytes(marked)
            );
        }
        if clean {
            store.update(|sb| sb.flags.remove(Flags::CLEAN_SHUTDOWN))?;
        }
        let sb = store.superblock().clone();
        let mut disk = storage::open_disk(&me.disk, Some(sb.data_size), engine)?;
        if let Some(spec) = me.disk_faults.clone() {
            disk = disk.with_faults(spec);
        }
        if disk.size() < sb.data_size {
            return Err(NodeError::DiskTooSmall {
                path: me.disk.clone(),
                actual: disk.size(),
                expected: sb.data_size,
            });
        }
        if sb.flags.contains(Flags::WAS_PRIMARY) {
            tracing::warn!(
                "this node was primary when it stopped{}; it starts secondary as always",
                if sb.flags.contains(Flags::CLEAN_SHUTDOWN) {
                    ""
                } else {
                    " and did not shut down cleanly"
                }
            );
        }
        let disk = Arc::new(disk);
        let meta = Arc::new(Mutex::new(store));
        let changed = Arc::new(Notify::new());
        let (repl_tx, repl_rx) = mpsc::unbounded_channel();
        let health = DiskHealth::new(repl_tx.clone());
        let recovery_dir = recovery_dir(&me.meta, &me.disk, disk_is_block(&me.disk));
        let repl = cfg.peer_of(&me.name).map(|peer| {
            Replicator::new(
                ReplSettings {
                    protocol: cfg.resource.protocol,
                    interval: cfg.heartbeat.interval,
                    timeout: cfg.heartbeat.timeout,
                    ack_timeout: cfg.heartbeat.ack_timeout,
                    rate_bytes_per_s: cfg.sync.rate_bytes_per_s(),
                    al_extents: cfg.sync.al_extents,
                    auto_promote: cfg.failover.auto_promote,
                    after_split_brain: cfg.failover.after_split_brain,
                    recovery_dir: recovery_dir.clone(),
                    link: LinkParams {
                        resource: cfg.resource.name.clone(),
                        secret: cfg.resource.secret.clone(),
                        me: me.name.clone(),
                        node_id: sb.node_id,
                        peer: peer.name.clone(),
                        size: sb.data_size,
                        granularity: sb.granularity,
                        listen: me.replication,
                        peer_addr: peer.replication,
                    },
                },
                Arc::clone(&disk),
                Arc::clone(&meta),
                Arc::clone(&changed),
                repl_tx.clone(),
                Arc::clone(&health),
            )
        });
        let export = Arc::new(Export {
            backend: Arc::new(ReplicatedDisk::new(
                Arc::clone(&disk),
                repl.clone(),
                Arc::clone(&health),
            )),
            size: sb.data_size,
        });
        let (export_tx, export_rx) = watch::channel(ExportState::Closed(secondary_reason(
            &me.name,
            &cfg.resource.name,
        )));
        let nbd = Arc::new(ServerCtx::new(cfg.resource.name.clone(), export_rx));
        let peer_name = cfg
            .peer_of(&me.name)
            .map(|p| p.name.clone())
            .unwrap_or_default();
        let (events, _) = broadcast::channel(1024);
        Ok(Arc::new(Node {
            peer_name,
            meta,
            disk,
            repl,
            export,
            export_tx,
            nbd,
            snapshot: Mutex::new(Snapshot {
                role: Role::Secondary,
            }),
            transition: tokio::sync::Mutex::new(()),
            events,
            changed,
            repl_events: Mutex::new(Some(repl_rx)),
            health,
            detail: Mutex::new("started".into()),
            cfg,
            me,
        }))
    }

    fn disk_state(&self) -> DiskStatus {
        if let Some(d) = self.health.status() {
            return d;
        }
        disk_status(
            self.meta
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .superblock()
                .disk_state,
        )
    }

    fn snap(&self) -> Snapshot {
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_snap(&self, f: impl FnOnce(&mut Snapshot), detail: &str) {
        f(&mut self.snapshot.lock().unwrap_or_else(|p| p.into_inner()));
        *self.detail.lock().unwrap_or_else(|p| p.into_inner()) = detail.to_string();
        self.changed.notify_one();
    }

    /// Runs a metadata update on the blocking pool (it syncs to disk).
    async fn meta_update(
        self: &Arc<Self>,
        f: impl FnOnce(&mut meta::Superblock) + Send + 'static,
    ) -> Result<(), String> {
        let node = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut m = node.meta.lock().unwrap_or_else(|p| p.into_inner());
            m.update(f).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    pub fn status(&self) -> Status {
        let s = self.snap();
        let (out_of_sync, generation) = {
            let m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            (
                m.bitmap().dirty_bytes(),
                format!("{:016x}", m.superblock().generations.current),
            )
        };
        let r = self.repl.as_ref().map(|r| r.status());
        // A sync target's own bitmap holds only its own marks; what it knows differs from
        // the source is what the resync has left to copy.
        let out_of_sync = match r.as_ref() {
            Some(r) if r.connection == Connection::SyncTarget => r
                .resync
                .as_ref()
                .map_or(out_of_sync, |p| p.total_bytes.saturating_sub(p.done_bytes)),
            _ => out_of_sync,
        };
        Status {
            resource: self.cfg.resource.name.clone(),
            node: self.me.name.clone(),
            role: s.role,
            disk: self.disk_state(),
            connection: r.as_ref().map_or(Connection::Standalone, |r| r.connection),
            peer: PeerStatus {
                name: self.peer_name.clone(),
                role: r.as_ref().map_or(Role::Unknown, |r| r.peer_role),
                disk: r.as_ref().map_or(DiskStatus::Unknown, |r| r.peer_disk),
            },
            size_bytes: self.export.size,
            out_of_sync_bytes: out_of_sync,
            resync: r.as_ref().and_then(|r| r.resync.clone()),
            stats: Stats {
                resynced_bytes_total: r.as_ref().map_or(0, |r| r.resynced_bytes),
                replicated_writes_total: r.as_ref().map_or(0, |r| r.replicated_writes),
                nbd_clients: self.nbd.clients.load(Ordering::SeqCst) as u64,
                nbd_requests_total: self.nbd.requests.load(Ordering::Relaxed),
                activity_log_writes_total: r.as_ref().map_or(0, |r| r.activity_log_writes),
            },
            io_engine: self.disk.engine().to_string(),
            nbd: self.me.nbd.to_string(),
            generation,
        }
    }

    fn view(&self) -> RoleView {
        let s = self.snap();
        RoleView {
            role: s.role,
            disk: self.disk_state(),
            peer_role: self.repl.as_ref().and_then(|r| r.peer_role()),
            nbd_clients: self.nbd.clients.load(Ordering::SeqCst) as u64,
        }
    }

    /// Makes this node primary and opens the export.
    pub async fn promote(self: &Arc<Self>, force: bool) -> Result<String, String> {
        let _guard = self.transition.lock().await;
        let forced = match state::promote(&self.view(), force).map_err(|e| e.to_string())? {
            Decision::Already => return Ok(format!("{} is already primary", self.me.name)),
            Decision::Change { forced_up_to_date } => forced_up_to_date,
        };
        let seed: u64 = rand::random();
        // A promotion starts a new data generation. A peer in sync follows it; otherwise the
        // old generation becomes the bitmap's reference: what the absent peer still has.
        let peer_follows = self.repl.as_ref().is_some_and(|r| r.in_sync());
        self.meta_update(move |sb| {
            if forced {
                sb.disk_state = DiskState::UpToDate;
            }
            let old = sb.generations.current;
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
            sb.new_current_generation(&mut rng);
            if !peer_follows && sb.generations.bitmap == 0 && old != 0 {
                sb.generations.bitmap = old;
            }
            sb.flags.insert(Flags::WAS_PRIMARY);
            sb.promoted_at_ms = now_ms();
        })
        .await
        .map_err(|e| format!("cannot record the promotion in the metadata: {e}"))?;
        self.set_snap(
            |s| s.role = Role::Primary,
            if forced {
                "promoted (forced: this node's data is now the reference)"
            } else {
                "promoted"
            },
        );
        if let Some(r) = &self.repl {
            r.role_changed(true).await;
        }
        self.export_tx
            .send_replace(ExportState::Open(Arc::clone(&self.export)));
        tracing::info!(
            forced,
            "promoted to primary; NBD export open on {}",
            self.me.nbd
        );
        self.run_handler("promote");
        Ok(format!("{} is now primary", self.me.name))
    }

    /// Closes the export (after the clients are gone) and makes this node secondary.
    pub async fn demote(self: &Arc<Self>, force: bool) -> Result<String, String> {
        let _guard = self.transition.lock().await;
        match state::demote(&self.view(), force).map_err(|e| e.to_string())? {
            Decision::Already => return Ok(format!("{} is already secondary", self.me.name)),
            Decision::Change { .. } => {}
        }
        self.close_export(&secondary_reason(&self.me.name, &self.cfg.resource.name))
            .await;
        self.disk
            .flush()
            .await
            .map_err(|e| format!("flush before demotion failed: {e}"))?;
        self.meta_update(|sb| sb.flags.remove(Flags::WAS_PRIMARY))
            .await
            .map_err(|e| format!("cannot record the demotion in the metadata: {e}"))?;
        self.set_snap(|s| s.role = Role::Secondary, "demoted");
        if let Some(r) = &self.repl {
            r.role_changed(false).await;
        }
        tracing::info!("demoted to secondary; NBD export closed");
        self.run_handler("demote");
        Ok(format!("{} is now secondary", self.me.name))
    }

    /// Refuses new clients, lets the connected ones finish what they sent, and waits for them.
    async fn close_export(&self, reason: &str) {
        self.export_tx
            .send_replace(ExportState::Closed(reason.to_string()));
        let deadline = tokio::time::Instant::now() + CLIENT_DRAIN;
        while self.nbd.clients.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("NBD clients still connected after {CLIENT_DRAIN:?}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Clean shutdown: clients drained, data flushed, metadata marked clean.
    pub async fn shutdown(self: &Arc<Self>) {
        let _guard = self.transition.lock().await;
        self.close_export(&format!("twinbd node {} is shutting down", self.me.name))
            .await;
        if let Some(r) = &self.repl {
            r.shutdown().await;
        }
        // Without its data on disk the node did not shut down cleanly: the next start must
        // recover from its activity log as after a crash.
        let data_flushed = match self.disk.flush().await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "final flush failed: the metadata stays marked unclean");
                false
            }
        };
        let node = Arc::clone(self);
        let res = tokio::task::spawn_blocking(move || {
            let mut m = node.meta.lock().unwrap_or_else(|p| p.into_inner());
            m.flush_bitmap()?;
            if data_flushed {
                m.update(|sb| sb.flags.insert(Flags::CLEAN_SHUTDOWN))?;
            }
            Ok::<(), crate::meta::MetaError>(())
        })
        .await;
        match res {
            Ok(Ok(())) if data_flushed => {
                tracing::info!("clean shutdown: data flushed, metadata marked clean")
            }
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot mark the metadata clean"),
            Err(e) => tracing::error!(error = %e, "metadata task failed"),
        }
    }

    /// Runs the `[handlers]` command for `event` (promote, demote, split_brain, peer_lost,
    /// disk_failure), if one is configured: `sh -c`, with the resource, node, role and peer
    /// in its environment, killed after 60 s; its failure is logged, never fatal.
    fn run_handler(&self, event: &'static str) {
        let h = &self.cfg.handlers;
        let cmd = match event {
            "promote" => h.on_promote.clone(),
            "demote" => h.on_demote.clone(),
            "split_brain" => h.on_split_brain.clone(),
            "peer_lost" => h.on_peer_lost.clone(),
            "disk_failure" => h.on_disk_failure.clone(),
            _ => None,
        };
        let Some(cmd) = cmd else {
            return;
        };
        let role = match self.snap().role {
            Role::Primary => "primary",
            _ => "secondary",
        };
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c")
            .arg(&cmd)
            .env("TWINBD_RESOURCE", &self.cfg.resource.name)
            .env("TWINBD_NODE", &self.me.name)
            .env("TWINBD_ROLE", role)
            .env("TWINBD_PEER", &self.peer_name)
            .env("TWINBD_EVENT", event)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        tokio::spawn(async move {
            let child = match c.spawn() {
                Ok(ch) => ch,
                Err(e) => {
                    tracing::error!(event, command = %cmd, error = %e, "cannot start handler");
                    return;
                }
            };
            match tokio::time::timeout(HANDLER_TIMEOUT, child.wait_with_output()).await {
                Err(_) => {
                    tracing::error!(event, command = %cmd, "handler killed after {HANDLER_TIMEOUT:?}")
                }
                Ok(Err(e)) => tracing::error!(event, command = %cmd, error = %e, "handler failed"),
                Ok(Ok(out)) if !out.status.success() => {
                    let err = String::from_utf8_lossy(&out.stderr);
                    tracing::error!(event, command = %cmd, status = %out.status, stderr = %err.trim(), "handler failed");
                }
                Ok(Ok(_)) => tracing::info!(event, command = %cmd, "handler ran"),
            }
        });
    }

    fn note(&self, detail: String) {
        *self.detail.lock().unwrap_or_else(|p| p.into_inner()) = detail;
        self.changed.notify_one();
    }

    /// Acts on what the replicator reports: handlers, automatic failover, split-brain demotion.
    async fn repl_events(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<ReplEvent>) {
        while let Some(ev) = rx.recv().await {
            match ev {
                ReplEvent::DiskFailed { error } => self.disk_failed(error).await,
                ReplEvent::PeerLost {
                    standby_of_primary,
                    silent,
                    reason,
                } => {
                    self.note(format!("peer lost: {reason}"));
                    self.run_handler("peer_lost");
                    if standby_of_primary && self.cfg.failover.auto_promote {
                        let node = Arc::clone(&self);
                        tokio::spawn(async move { node.auto_failover(silent).await });
                    }
                }
                ReplEvent::SplitBrain { resolution } => {
                    self.note(format!("split brain: {resolution}"));
                    self.run_handler("split_brain");
                }
                ReplEvent::DemoteForResolution { done } => {
                    let res = self.demote(true).await.map(drop);
                    let _ = done.send(res);
                }
                ReplEvent::RecoverySaved { path, records } => {
                    self.note(format!(
                        "split brain resolved: {records} overwritten block run(s) saved to {}",
                        path.display()
                    ));
                }
            }
        }
    }

    /// The local disk returned an IO error: report it (status `failed`, an event, the
    /// `on_disk_failure` handler), record in the metadata that this disk's data can no longer
    /// be trusted, then go on diskless.
    async fn disk_failed(self: &Arc<Self>, error: String) {
        self.note(format!("disk failed: {error}"));
        let st = self.status();
        if let Ok(line) = serde_json::to_string(&Event {
            ts_ms: now_ms(),
            kind: "disk".into(),
            detail: format!("disk failed: {error}"),
            status: st,
        }) {
            let _ = self.events.send(line);
        }
        self.run_handler("disk_failure");
        // Best effort: the metadata may live on the failed disk.
        if let Err(e) = self
            .meta_update(|sb| sb.disk_state = DiskState::Inconsistent)
            .await
        {
            tracing::error!("cannot record the disk failure in the metadata: {e}");
        }
        self.health.set_diskless();
        tracing::error!(
            "disk detached: this node is now diskless{}",
            if self.snap().role == Role::Primary {
                "; the export is served through the peer"
            } else {
                ""
            }
        );
        if let Some(r) = &self.repl {
            r.local_disk_failed().await;
        }
        self.note("diskless".into());
    }

    /// Automatic failover: the primary's heartbeat is gone. Once `timeout_ms` has passed since
    /// it was last heard (the link may have ended earlier, on a closed connection), and if it
    /// has not come back, this up-to-date standby promotes itself.
    async fn auto_failover(self: Arc<Self>, silent: Duration) {
        if let Some(wait) = self.cfg.heartbeat.timeout.checked_sub(silent) {
            tokio::time::sleep(wait).await;
        }
        let back = self
            .repl
            .as_ref()
            .is_some_and(|r| r.connected() || !r.enabled());
        if back || self.snap().role == Role::Primary || self.disk_state() != DiskStatus::UpToDate {
            tracing::info!("automatic failover not needed or not allowed (peer back, already primary, or disk not up to date)");
            return;
        }
        tracing::warn!("automatic failover: the primary is gone; promoting this standby");
        match self.promote(false).await {
            Ok(m) => {
                tracing::warn!("automatic failover: {m}");
                self.note("promoted by automatic failover".into());
            }
            Err(e) => tracing::error!("automatic failover refused: {e}"),
        }
    }

    /// The next line of the `events` stream, if the visible state changed since `last` (the
    /// status last sent and when). While a resync runs, a line goes out at least every
    /// `RESYNC_EVENT_EVERY` even when its progress has not moved (a stalled resync shows).
    fn event_line(&self, last: &mut Option<(Status, Instant)>) -> Option<String> {
        let st = self.status();
        let kind = match last {
            None => "start",
            Some((prev, at)) => {
                if prev.role != st.role {
                    "role"
                } else if prev.disk != st.disk {
                    "disk"
                } else if prev.connection != st.connection || prev.peer != st.peer {
                    "connection"
                } else if prev.resync.is_some() || st.resync.is_some() {
                    if prev.resync == st.resync && at.elapsed() < RESYNC_EVENT_EVERY {
                        return None;
                    }
                    "resync"
                } else if prev.stats.nbd_clients != st.stats.nbd_clients {
                    "nbd_clients"
                } else if prev.out_of_sync_bytes != st.out_of_sync_bytes {
                    "out_of_sync"
                } else {
                    return None;
                }
            }
        };
        let detail = self
            .detail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let ev = Event {
            ts_ms: now_ms(),
            kind: kind.into(),
            detail,
            status: st.clone(),
        };
        *last = Some((st, Instant::now()));
        serde_json::to_string(&ev).ok()
    }

    /// Publishes an event whenever the visible state changes (checked on every notification
    /// and at least every 250 ms, so resync progress is reported more than once a second).
    async fn watch_events(self: Arc<Self>) {
        let mut last = None;
        loop {
            if let Some(line) = self.event_line(&mut last) {
                let _ = self.events.send(line);
            }
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    async fn handle(self: &Arc<Self>, req: Request) -> Reply {
        match req {
            Request::Status => Reply::status(self.status()),
            Request::Promote { force } => match self.promote(force).await {
                Ok(m) => Reply::message(m),
                Err(e) => Reply::error(format!("promote refused: {e}")),
            },
            Request::Demote { force } => match self.demote(force).await {
                Ok(m) => Reply::message(m),
                Err(e) => Reply::error(format!("demote refused: {e}")),
            },
            Request::Connect { discard_my_data } => match &self.repl {
                None => Reply::error(self.no_peer_link()),
                Some(r) if discard_my_data && r.connected() => Reply::error(format!(
                    "connect refused: {} is already connected to {}; --discard-my-data applies to the next connection only (run `twinbd disconnect` first)",
                    self.me.name, self.peer_name
                )),
                Some(r) if discard_my_data => {
                    r.discard_my_data();
                    r.set_enabled(true);
                    Reply::message(format!(
                        "{}: connecting to {}; in a split brain this node gives up its changes (saved to a recovery file first)",
                        self.me.name, self.peer_name
                    ))
                }
                Some(r) => {
                    r.set_enabled(true);
                    Reply::message(format!(
                        "{}: connecting to {}",
                        self.me.name, self.peer_name
                    ))
                }
            },
            Request::Disconnect => match &self.repl {
                None => Reply::error(self.no_peer_link()),
                Some(r) => {
                    r.disconnect().await;
                    Reply::message(format!(
                        "{}: disconnected from {}",
                        self.me.name, self.peer_name
                    ))
                }
            },
            Request::Verify => match &self.repl {
                None => Reply::error(self.no_peer_link()),
                Some(r) => match r.verify().await {
                    Ok(v) => Reply::message(format!(
                        "verify: {} bytes checked in {:.1} s; {} block(s) ({} bytes) differed{}",
                        v.checked_bytes,
                        v.seconds,
                        v.differing_blocks,
                        v.differing_bytes,
                        if v.differing_blocks > 0 {
                            "; marked out of sync and being resynced from this node"
                        } else {
                            ""
                        }
                    )),
                    Err(e) => Reply::error(format!("verify failed: {e}")),
                },
            },
            Request::Events => Reply::error("events is a streaming request"),
        }
    }

    fn no_peer_link(&self) -> String {
        if self.peer_name.is_empty() {
            format!(
                "resource {} has no peer configured: this node runs standalone",
                self.cfg.resource.name
            )
        } else {
            format!("node {} has a peer", self.me.name)
        }
    }
}

fn secondary_reason(node: &str, resource: &str) -> String {
    format!("twinbd node {node} is secondary: only the primary serves resource {resource}")
}

/// Binds the admin socket, refusing to steal it from a live daemon.
fn bind_admin(path: &Path) -> Result<UnixListener, NodeError> {
    let admin = |source| NodeError::Admin {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(admin)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(NodeError::AlreadyRunning(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(admin)?;
    }
    UnixListener::bind(path).map_err(admin)
}

async fn serve_admin(node: Arc<Node>, listener: UnixListener, mut stop: watch::Receiver<bool>) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.changed() => return,
        };
        match conn {
            Ok((stream, _)) => {
                tokio::spawn(admin_session(Arc::clone(&node), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn admin_session(node: Arc<Node>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Events) => {
                stream_events(&node, &mut w).await;
                return;
            }
            Ok(req) => node.handle(req).await,
            Err(e) => Reply::error(format!("bad control request: {e}")),
        };
        let mut out = match serde_json::to_string(&reply) {
            Ok(s) => s,
            Err(e) => format!("{{\"ok\":false,\"error\":\"{e}\"}}"),
        };
        out.push('\n');
        if w.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn stream_events(node: &Arc<Node>, w: &mut tokio::net::unix::OwnedWriteHalf) {
    let mut rx = node.events.subscribe();
    // The first line is the current state, so a watcher starts from a known point.
    let first = Event {
        ts_ms: now_ms(),
        kind: "current".into(),
        detail: String::new(),
        status: node.status(),
    };
    let Ok(mut line) = serde_json::to_string(&first) else {
        return;
    };
    loop {
        line.push('\n');
        if w.write_all(line.as_bytes()).await.is_err() {
            return;
        }
        line = match rx.recv().await {
            Ok(l) => l,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                format!(
                    "{{\"ts_ms\":{},\"kind\":\"lagged\",\"detail\":\"{n} events dropped\"}}",
                    now_ms()
                )
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
    }
}

/// `run`: the daemon, until SIGTERM or SIGINT.
pub async fn run(cfg: Config, node_name: &str) -> Result<(), NodeError> {
    let engine = EngineChoice::from_env().map_err(NodeError::Runtime)?;
    let node = Node::open(cfg, node_name, engine)?;
    let listener = Listener::bind(&node.me.nbd)
        .await
        .map_err(|source| NodeError::NbdBind {
            addr: node.me.nbd.to_string(),
            source,
        })?;
    let admin = bind_admin(&node.me.admin)?;
    if let Some(r) = &node.repl {
        r.start().await.map_err(|source| NodeError::ReplBind {
            addr: node.me.replication.to_string(),
            source,
        })?;
    }
    let admin_path = node.me.admin.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let nbd_task = tokio::spawn(nbd::serve(listener, Arc::clone(&node.nbd), stop_rx.clone()));
    let admin_task = tokio::spawn(serve_admin(Arc::clone(&node), admin, stop_rx));
    let events_task = tokio::spawn(Arc::clone(&node).watch_events());
    if let Some(rx) = node
        .repl_events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        tokio::spawn(Arc::clone(&node).repl_events(rx));
    }
    tracing::info!(
        resource = %node.cfg.resource.name,
        node = %node.me.name,
        nbd = %node.me.nbd,
        admin = %node.me.admin.display(),
        size = node.export.size,
        engine = node.disk.engine(),
        "twinbd node running (secondary)"
    );

    wait_for_signal().await?;
    tracing::info!("shutting down");
    node.shutdown().await;
    let _ = stop_tx.send(true);
    let _ = nbd_task.await;
    let _ = admin_task.await;
    events_task.abort();
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}

async fn wait_for_signal() -> Result<(), NodeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |k| {
        signal(k).map_err(|e| NodeError::Runtime(format!("cannot install signal handler: {e}")))
    };
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_files_go_beside_the_metadata_or_to_persistent_storage() {
        let ext = MetaSpec::External(PathBuf::from("/srv/meta/r0.meta"));
        assert_eq!(
            recovery_dir(&ext, Path::new("/dev/vdb"), true),
            Path::new("/srv/meta")
        );
        assert_eq!(
            recovery_dir(&MetaSpec::Internal, Path::new("/srv/img/r0.img"), false),
            Path::new("/srv/img")
        );
        // Internal metadata on a block device: not /dev, which does not survive a reboot.
        assert_eq!(
            recovery_dir(&MetaSpec::Internal, Path::new("/dev/vdb"), true),
            Path::new(DEFAULT_RECOVERY_DIR)
        );
        assert!(!disk_is_block(Path::new("/no/such/disk")));
    }
}
