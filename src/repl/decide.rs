//! Who syncs from whom when two nodes meet: a pure function of both nodes' generations.
//!
//! Generation identifiers (see `meta::Generations`): `current` names the data a node holds;
//! `bitmap` is non-zero while the node tracks changes against a peer that was in sync with it
//! at generation `bitmap`; `history` keeps the previous `current` values. A primary that writes
//! while its peer is away moves `current` on (the old value goes to `bitmap`), and a promotion
//! starts a new `current` too. When the nodes meet again:
//!
//! * equal `current`: same data, up to the bits both bitmaps hold;
//! * my `bitmap` is the peer's `current`: I moved on from where the peer still is: I am the sync
//!   source and my bitmap says what changed;
//! * both `bitmap`s equal and both moved on: both wrote while apart: split brain;
//! * a node without consistent data gets a full sync from one with it;
//! * the peer's `current` is in my history, but no bitmap relates us: full sync from me;
//! * anything else: unrelated data, refused.

use crate::meta::DiskState;

/// One node's view of itself, as exchanged at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    pub primary: bool,
    pub disk: DiskState,
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
    pub dirty_bytes: u64,
    /// Tie-break when neither node has a reason to lead (the node id).
    pub id: u64,
}

impl Side {
    fn has_data(&self) -> bool {
        self.disk != DiskState::Inconsistent && self.current != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to copy.
    InSync,
    /// Neither node holds consistent data: wait for a promotion.
    NoData,
    /// Copy to the peer: everything (`full`) or what the bitmaps mark.
    Source { full: bool },
    /// Copy from the peer.
    Target { full: bool },
    /// Both nodes changed the data while apart.
    SplitBrain,
    /// The nodes' data share no history.
    Unrelated,
    /// This node is primary but its peer holds newer data.
    PrimaryBehind,
    /// The peer is primary but this node holds newer data.
    PeerPrimaryBehind,
}

fn raw(me: &Side, peer: &Side) -> Decision {
    let (mine, theirs) = (me.has_data(), peer.has_data());
    if !mine && !theirs {
        return Decision::NoData;
    }
    if me.current == peer.current && me.current != 0 {
        if mine && theirs {
            if me.dirty_bytes == 0 && peer.dirty_bytes == 0 {
                return Decision::InSync;
            }
            let me_leads = if me.primary != peer.primary {
                me.primary
            } else {
                me.id > peer.id
            };
            return if me_leads {
                Decision::Source { full: false }
            } else {
                Decision::Target { full: false }
            };
        }
        return if mine {
            Decision::Source { full: false }
        } else {
            Decision::Target { full: false }
        };
    }
    let i_moved_on = mine && me.bitmap != 0 && me.bitmap == peer.current;
    let peer_moved_on = theirs && peer.bitmap != 0 && peer.bitmap == me.current;
    match (i_moved_on, peer_moved_on) {
        (true, true) => return Decision::SplitBrain,
        (true, false) => return Decision::Source { full: false },
        (false, true) => return Decision::Target { full: false },
        (false, false) => {}
    }
    if mine && theirs && me.bitmap != 0 && me.bitmap == peer.bitmap {
        return Decision::SplitBrain;
    }
    if mine && !theirs {
        return Decision::Source { full: true };
    }
    if theirs && !mine {
        return Decision::Target { full: true };
    }
    let peer_in_my_past = peer.current != 0 && me.history.contains(&peer.current);
    let me_in_peer_past = me.current != 0 && peer.history.contains(&me.current);
    match (peer_in_my_past, me_in_peer_past) {
        (true, false) => Decision::Source { full: true },
        (false, true) => Decision::Target { full: true },
        _ => Decision::Unrelated,
    }
}

/// What this node does with its peer.
pub fn decide(me: &Side, peer: &Side) -> Decision {
    match raw(me, peer) {
        Decision::Target { .. } if me.primary => Decision::PrimaryBehind,
        Decision::Source { .. } if peer.primary => Decision::PeerPrimaryBehind,
        d => d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn side(current: u64, bitmap: u64) -> Side {
        Side {
            primary: false,
            disk: DiskState::UpToDate,
            current,
            bitmap,
            history: [0, 0],
            dirty_bytes: 0,
            id: 1,
        }
    }

    fn fresh() -> Side {
        Side {
            disk: DiskState::Inconsistent,
            ..side(0, 0)
        }
    }

    #[test]
    fn the_usual_cases() {
        // Two fresh nodes: nothing to do until one is promoted.
        assert_eq!(decide(&fresh(), &fresh()), Decision::NoData);
        // The promoted node fully syncs the fresh one.
        let promoted = Side {
            primary: true,
            ..side(10, 0)
        };
        assert_eq!(decide(&promoted, &fresh()), Decision::Source { full: true });
        assert_eq!(decide(&fresh(), &promoted), Decision::Target { full: true });
        // In sync.
        assert_eq!(decide(&side(10, 0), &side(10, 0)), Decision::InSync);
        // The primary wrote while the secondary was away.
        let moved = Side {
            primary: true,
            ..side(11, 10)
        };
        assert_eq!(
            decide(&moved, &side(10, 0)),
            Decision::Source { full: false }
        );
        assert_eq!(
            decide(&side(10, 0), &moved),
            Decision::Target { full: false }
        );
        // Both wrote while apart.
        let other = Side {
            id: 2,
            ..side(12, 10)
        };
        assert_eq!(decide(&side(11, 10), &other), Decision::SplitBrain);
        // Unrelated data.
        assert_eq!(decide(&side(5, 0), &side(6, 0)), Decision::Unrelated);
        // Related only through history: full sync from the newer.
        let newer = Side {
            history: [20, 6],
            ..side(21, 0)
        };
        assert_eq!(decide(&newer, &side(6, 0)), Decision::Source { full: true });
        // A primary never becomes a sync target.
        let stale_primary = Side {
            primary: true,
            ..side(10, 0)
        };
        assert_eq!(
            decide(&stale_primary, &side(11, 10)),
            Decision::PrimaryBehind
        );
        assert_eq!(
            decide(&side(11, 10), &stale_primary),
            Decision::PeerPrimaryBehind
        );
        // Same generation, bits on one side: the primary leads.
        let dirty_primary = Side {
            primary: true,
            dirty_bytes: 4096,
            ..side(10, 0)
        };
        assert_eq!(
            decide(&dirty_primary, &side(10, 0)),
            Decision::Source { full: false }
        );
        // An interrupted target (inconsistent, still at the old generation) resumes by bitmap.
        let interrupted = Side {
            disk: DiskState::Inconsistent,
            ..side(10, 0)
        };
        assert_eq!(
            decide(&moved, &interrupted),
            Decision::Source { full: false }
        );
    }

    fn any_side() -> impl Strategy<Value = Side> {
        (
            any::<bool>(),
            0u8..3,
            0u64..4,
            0u64..4,
            (0u64..4, 0u64..4),
            0u64..2,
            0u64..3,
        )
            .prop_map(|(primary, d, current, bitmap, (h0, h1), dirty, id)| Side {
                primary,
                disk: DiskState::from_u8(d).unwrap_or(DiskState::Inconsistent),
                current,
                bitmap,
                history: [h0, h1],
                dirty_bytes: dirty * 4096,
                id,
            })
    }

    fn mirror(d: Decision) -> Decision {
        match d {
            Decision::Source { full } => Decision::Target { full },
            Decision::Target { full } => Decision::Source { full },
            Decision::PrimaryBehind => Decision::PeerPrimaryBehind,
            Decision::PeerPrimaryBehind => Decision::PrimaryBehind,
            d => d,
        }
    }

    proptest! {
        /// Both nodes compute the decision independently: they must agree.
        #[test]
        fn both_sides_agree(a in any_side(), b in any_side()) {
            prop_assume!(a.id != b.id);
            prop_assert_eq!(decide(&a, &b), mirror(decide(&b, &a)));
        }

        /// Data never flows from a node without consistent data.
        #[test]
        fn never_from_nothing(a in any_side(), b in any_side()) {
            prop_assume!(a.id != b.id);
            if let Decision::Source { .. } = decide(&a, &b) {
                prop_assert!(a.has_data());
            }
        }
    }
}
