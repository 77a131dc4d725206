//! Mutual authentication by HMAC-SHA256 challenge-response over the resource secret.
//!
//! Each side sends a random challenge in its `Hello`; each answers the other's challenge with
//! `HMAC-SHA256(secret, label ‖ challenge ‖ responder name ‖ channel ‖ session)`. The secret
//! never crosses the wire, a response is bound to the connection it was made for, and a node
//! cannot replay its peer's answer back to it (the responder's name is in the MAC).

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use super::wire::{Channel, CHALLENGE_LEN};

type HmacSha256 = hmac::Hmac<Sha256>;

const LABEL: &[u8] = b"twinbd-peer-auth-v1";

/// A fresh random challenge.
pub fn challenge() -> [u8; CHALLENGE_LEN] {
    rand::random()
}

fn mac(
    secret: &str,
    challenge: &[u8],
    responder: &str,
    channel: Channel,
    session: u64,
) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    m.update(LABEL);
    m.update(challenge);
    m.update(&(responder.len() as u32).to_be_bytes());
    m.update(responder.as_bytes());
    m.update(&[channel as u8]);
    m.update(&session.to_be_bytes());
    m
}

/// The response `responder` gives to `challenge`.
pub fn respond(
    secret: &str,
    challenge: &[u8; CHALLENGE_LEN],
    responder: &str,
    channel: Channel,
    session: u64,
) -> [u8; 32] {
    mac(secret, challenge, responder, channel, session)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks, in constant time, a response that `responder` gave to our `challenge`.
pub fn verify(
    secret: &str,
    challenge: &[u8; CHALLENGE_LEN],
    responder: &str,
    channel: Channel,
    session: u64,
    response: &[u8; 32],
) -> bool {
    mac(secret, challenge, responder, channel, session)
        .verify_slice(response)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_bind_secret_challenge_name_channel_and_session() {
        let c = challenge();
        let r = respond("s3cret", &c, "beta", Channel::Data, 7);
        assert!(verify("s3cret", &c, "beta", Channel::Data, 7, &r));
        assert!(!verify("wrong", &c, "beta", Channel::Data, 7, &r));
        assert!(!verify("s3cret", &c, "alpha", Channel::Data, 7, &r));
        assert!(!verify("s3cret", &c, "beta", Channel::Meta, 7, &r));
        assert!(!verify("s3cret", &c, "beta", Channel::Data, 8, &r));
        let mut other = c;
        other[0] ^= 1;
        assert!(!verify("s3cret", &other, "beta", Channel::Data, 7, &r));
        assert_ne!(challenge(), challenge());
    }
}
