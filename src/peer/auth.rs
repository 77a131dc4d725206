//! Mutual authentication by HMAC-SHA256 challenge-response over the resource secret.
//!
//! Each side sends a random challenge in its `Hello`. The dialer proves first:
//! `HMAC-SHA256(secret, label ‖ role ‖ verifier's challenge ‖ prover's challenge ‖ prover's
//! name ‖ channel ‖ session)`; the acceptor answers with its own proof only once the dialer's
//! checks out. The secret never crosses the wire, and a proof is bound to the connection it was
//! made for (both challenges, the channel and the session), to the prover's name (a node cannot
//! reflect its peer's proof back) and to the prover's role: a proof an acceptor gives can never
//! pass for a dialer's, so nobody can relay one node's challenge to the other and log in with
//! the answer.

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use super::wire::{Channel, CHALLENGE_LEN};

type HmacSha256 = hmac::Hmac<Sha256>;

const LABEL: &[u8] = b"twinbd-peer-auth-v2";

/// A fresh random challenge.
pub fn challenge() -> [u8; CHALLENGE_LEN] {
    rand::random()
}

/// Which end of the connection gives a proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Dialer = 1,
    Acceptor = 2,
}

/// What a proof is made over.
pub struct Proof<'a> {
    pub role: Role,
    /// The challenge of the side that checks the proof.
    pub verifier_challenge: &'a [u8; CHALLENGE_LEN],
    /// The challenge of the side that gives it.
    pub prover_challenge: &'a [u8; CHALLENGE_LEN],
    /// The name of the node that gives it.
    pub prover: &'a str,
    pub channel: Channel,
    pub session: u64,
}

impl Proof<'_> {
    fn mac(&self, secret: &str) -> HmacSha256 {
        // HMAC accepts keys of any length; this cannot fail.
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(secret.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        m.update(LABEL);
        m.update(&[self.role as u8]);
        m.update(self.verifier_challenge);
        m.update(self.prover_challenge);
        m.update(&(self.prover.len() as u32).to_be_bytes());
        m.update(self.prover.as_bytes());
        m.update(&[self.channel as u8]);
        m.update(&self.session.to_be_bytes());
        m
    }

    /// The proof, as its prover sends it.
    pub fn give(&self, secret: &str) -> [u8; 32] {
        self.mac(secret).finalize().into_bytes().into()
    }

    /// Checks, in constant time, a proof received.
    pub fn check(&self, secret: &str, mac: &[u8; 32]) -> bool {
        self.mac(secret).verify_slice(mac).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_secret_role_challenges_name_channel_and_session() {
        let (cv, cp) = (challenge(), challenge());
        let p = Proof {
            role: Role::Dialer,
            verifier_challenge: &cv,
            prover_challenge: &cp,
            prover: "alpha",
            channel: Channel::Data,
            session: 7,
        };
        let mac = p.give("s3cret");
        assert!(p.check("s3cret", &mac));
        assert!(!p.check("wrong", &mac));
        let mut other = cv;
        other[0] ^= 1;
        let variants = [
            Proof {
                role: Role::Acceptor,
                ..p
            },
            Proof {
                verifier_challenge: &other,
                ..p
            },
            Proof {
                prover_challenge: &other,
                ..p
            },
            Proof {
                verifier_challenge: &cp,
                prover_challenge: &cv,
                ..p
            },
            Proof {
                prover: "beta",
                ..p
            },
            Proof {
                channel: Channel::Meta,
                ..p
            },
            Proof { session: 8, ..p },
        ];
        for (i, v) in variants.iter().enumerate() {
            assert!(!v.check("s3cret", &mac), "variant {i} accepted the proof");
        }
        assert_ne!(challenge(), challenge());
    }
}
