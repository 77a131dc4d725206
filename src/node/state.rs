//! Role rules as plain functions over the node's state: no IO, no clock.
//!
//! The daemon asks these before it changes role; tests drive them directly.

use crate::status::{DiskStatus, Role};

/// What the role rules look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleView {
    pub role: Role,
    pub disk: DiskStatus,
    /// The peer's role while the link is up; `None` when not connected.
    pub peer_role: Option<Role>,
    pub nbd_clients: u64,
}

/// A permitted role change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead. `forced_up_to_date` means `--force` is making this node's data the reference
    /// (its disk was not known up to date): the disk becomes up to date with a new generation.
    Change { forced_up_to_date: bool },
    /// Already in the requested role: nothing to do.
    Already,
}

/// Why a role change is refused. The messages are what the operator reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the peer is connected and primary; demote it first (or use --force)")]
    PeerPrimary,
    #[error("the local disk is {0} (not known to be up to date); use --force to make this node's data the reference")]
    DiskNotUpToDate(&'static str),
    #[error("the local disk is {0}: there is no data to serve")]
    NoData(&'static str),
    #[error("{0} NBD client(s) hold the export open; disconnect them or use --force")]
    ClientsConnected(u64),
}

pub fn disk_name(d: DiskStatus) -> &'static str {
    match d {
        DiskStatus::UpToDate => "up_to_date",
        DiskStatus::Inconsistent => "inconsistent",
        DiskStatus::Outdated => "outdated",
        DiskStatus::Diskless => "diskless",
        DiskStatus::Failed => "failed",
        DiskStatus::Unknown => "unknown",
    }
}

/// May this node become primary?
pub fn promote(v: &RoleView, force: bool) -> Result<Decision, Refusal> {
    if v.role == Role::Primary {
        return Ok(Decision::Already);
    }
    if v.peer_role == Some(Role::Primary) && !force {
        return Err(Refusal::PeerPrimary);
    }
    match v.disk {
        DiskStatus::UpToDate => Ok(Decision::Change {
            forced_up_to_date: false,
        }),
        DiskStatus::Inconsistent | DiskStatus::Outdated | DiskStatus::Unknown => {
            if force {
                Ok(Decision::Change {
                    forced_up_to_date: true,
                })
            } else {
                Err(Refusal::DiskNotUpToDate(disk_name(v.disk)))
            }
        }
        DiskStatus::Diskless | DiskStatus::Failed => Err(Refusal::NoData(disk_name(v.disk))),
    }
}

/// May this node become secondary?
pub fn demote(v: &RoleView, force: bool) -> Result<Decision, Refusal> {
    if v.role != Role::Primary {
        return Ok(Decision::Already);
    }
    if v.nbd_clients > 0 && !force {
        return Err(Refusal::ClientsConnected(v.nbd_clients));
    }
    Ok(Decision::Change {
        forced_up_to_date: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(role: Role, disk: DiskStatus) -> RoleView {
        RoleView {
            role,
            disk,
            peer_role: None,
            nbd_clients: 0,
        }
    }

    #[test]
    fn promote_rules() {
        let fresh = view(Role::Secondary, DiskStatus::Inconsistent);
        assert_eq!(
            promote(&fresh, false),
            Err(Refusal::DiskNotUpToDate("inconsistent"))
        );
        assert_eq!(
            promote(&fresh, true),
            Ok(Decision::Change {
                forced_up_to_date: true
            })
        );
        let good = view(Role::Secondary, DiskStatus::UpToDate);
        assert_eq!(
            promote(&good, false),
            Ok(Decision::Change {
                forced_up_to_date: false
            })
        );
        let peer_primary = RoleView {
            peer_role: Some(Role::Primary),
            ..good
        };
        assert_eq!(promote(&peer_primary, false), Err(Refusal::PeerPrimary));
        assert_eq!(
            promote(&view(Role::Primary, DiskStatus::UpToDate), false),
            Ok(Decision::Already)
        );
        assert!(matches!(
            promote(&view(Role::Secondary, DiskStatus::Failed), true),
            Err(Refusal::NoData(_))
        ));
    }

    #[test]
    fn demote_rules() {
        let busy = RoleView {
            nbd_clients: 2,
            ..view(Role::Primary, DiskStatus::UpToDate)
        };
        assert_eq!(demote(&busy, false), Err(Refusal::ClientsConnected(2)));
        assert!(matches!(demote(&busy, true), Ok(Decision::Change { .. })));
        assert_eq!(
            demote(&view(Role::Secondary, DiskStatus::UpToDate), false),
            Ok(Decision::Already)
        );
        assert!(Refusal::ClientsConnected(2).to_string().contains("--force"));
    }
}
