//! The node's externally visible state: the `status --json` object of the interface contract,
//! and its human-readable table.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Secondary,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskStatus {
    UpToDate,
    Inconsistent,
    Outdated,
    Diskless,
    Failed,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Connection {
    Standalone,
    Connecting,
    Connected,
    SyncSource,
    SyncTarget,
    SplitBrain,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub role: Role,
    pub disk: DiskStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncStatus {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub rate_bytes_per_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub resynced_bytes_total: u64,
    pub replicated_writes_total: u64,
    pub nbd_clients: u64,
    /// NBD requests answered since the daemon started.
    #[serde(default)]
    pub nbd_requests_total: u64,
    /// Activity-log updates (metadata writes on the replicated write path) since start.
    #[serde(default)]
    pub activity_log_writes_total: u64,
}

/// `status --json`: the fields of the contract, then twinbd's own additions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub resource: String,
    pub node: String,
    pub role: Role,
    pub disk: DiskStatus,
    pub connection: Connection,
    pub peer: PeerStatus,
    pub size_bytes: u64,
    pub out_of_sync_bytes: u64,
    pub resync: Option<ResyncStatus>,
    pub stats: Stats,
    /// Storage engine in use ("io_uring" or "sync").
    #[serde(default)]
    pub io_engine: String,
    /// Where the export listens (`host:port` or `unix:/path`).
    #[serde(default)]
    pub nbd: String,
    /// Current data generation identifier (hex), "0" before the first promotion.
    #[serde(default)]
    pub generation: String,
}

fn name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl Status {
    /// The human-readable table of `twinbd status`.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let rows: Vec<(&str, String)> = vec![
            ("resource", self.resource.clone()),
            ("node", self.node.clone()),
            ("role", name(&self.role)),
            ("disk", name(&self.disk)),
            ("connection", name(&self.connection)),
            (
                "peer",
                format!(
                    "{} (role {}, disk {})",
                    self.peer.name,
                    name(&self.peer.role),
                    name(&self.peer.disk)
                ),
            ),
            ("size", human_bytes(self.size_bytes)),
            ("out of sync", human_bytes(self.out_of_sync_bytes)),
            (
                "resync",
                match &self.resync {
                    None => "-".into(),
                    Some(r) => format!(
                        "{} / {} ({:.1}%) at {}/s",
                        human_bytes(r.done_bytes),
                        human_bytes(r.total_bytes),
                        if r.total_bytes == 0 {
                            100.0
                        } else {
                            r.done_bytes as f64 * 100.0 / r.total_bytes as f64
                        },
                        human_bytes(r.rate_bytes_per_s)
                    ),
                },
            ),
            ("nbd export", self.nbd.clone()),
            ("nbd clients", self.stats.nbd_clients.to_string()),
            ("nbd requests", self.stats.nbd_requests_total.to_string()),
            (
                "replicated writes",
                self.stats.replicated_writes_total.to_string(),
            ),
            ("resynced", human_bytes(self.stats.resynced_bytes_total)),
            ("io engine", self.io_engine.clone()),
            ("generation", self.generation.clone()),
        ];
        for (k, v) in rows {
            let _ = writeln!(s, "{k:<18} {v}");
        }
        s
    }

    /// One line for a live display.
    pub fn line(&self) -> String {
        format!(
            "{}: {} {} {} | peer {} {} {} | oos {} | clients {} | reqs {}",
            self.node,
            name(&self.role),
            name(&self.disk),
            name(&self.connection),
            self.peer.name,
            name(&self.peer.role),
            name(&self.peer.disk),
            human_bytes(self.out_of_sync_bytes),
            self.stats.nbd_clients,
            self.stats.nbd_requests_total
        )
    }
}

/// Bytes with a binary unit, e.g. "256.0 MiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_contract_fields_and_names() {
        let st = Status {
            resource: "r0".into(),
            node: "alpha".into(),
            role: Role::Primary,
            disk: DiskStatus::UpToDate,
            connection: Connection::SyncSource,
            peer: PeerStatus {
                name: "beta".into(),
                role: Role::Unknown,
                disk: DiskStatus::Unknown,
            },
            size_bytes: 268435456,
            out_of_sync_bytes: 0,
            resync: None,
            stats: Stats {
                resynced_bytes_total: 0,
                replicated_writes_total: 0,
                nbd_clients: 0,
                nbd_requests_total: 0,
                activity_log_writes_total: 0,
            },
            io_engine: "io_uring".into(),
            nbd: "127.0.0.1:10809".into(),
            generation: "0".into(),
        };
        let v: serde_json::Value = serde_json::to_value(&st).expect("json");
        assert_eq!(v["role"], "primary");
        assert_eq!(v["disk"], "up_to_date");
        assert_eq!(v["connection"], "sync_source");
        assert_eq!(v["peer"]["role"], "unknown");
        assert!(v["resync"].is_null());
        for k in [
            "resynced_bytes_total",
            "replicated_writes_total",
            "nbd_clients",
        ] {
            assert!(v["stats"][k].is_u64(), "{k}");
        }
        assert!(st.table().contains("up_to_date"));
        assert_eq!(human_bytes(268435456), "256.0 MiB");
    }
}
