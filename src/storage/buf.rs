//! IO buffers recycled through a small pool.
//!
//! Large request buffers (reads and write payloads of 64 KiB and more) are expensive to get
//! fresh from the allocator: glibc serves them with `mmap`, so every request pays page faults
//! and zeroing of every page, and `munmap` after. Measured on 1 MiB requests this was a
//! quarter of the server's CPU time. Buffers of power-of-two capacities are therefore kept
//! when dropped and handed out again. A reused buffer is not zeroed: its old contents are
//! overwritten by the read or the payload that fills it (every user fills the whole length).

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Smallest capacity that is pooled.
const MIN_CLASS_SHIFT: u32 = 16; // 64 KiB
/// Largest capacity that is pooled.
const MAX_CLASS_SHIFT: u32 = 25; // 32 MiB
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;
/// Buffers kept per class.
const PER_CLASS: usize = 64;
/// Bytes kept per class at most.
const BYTES_PER_CLASS: usize = 64 << 20;

static POOL: Mutex<[Vec<Vec<u8>>; CLASSES]> = Mutex::new([const { Vec::new() }; CLASSES]);

fn class_of_len(len: usize) -> Option<usize> {
    if !((1 << MIN_CLASS_SHIFT)..=(1 << MAX_CLASS_SHIFT)).contains(&len) {
        return None;
    }
    let shift = usize::BITS - (len - 1).leading_zeros();
    Some((shift.max(MIN_CLASS_SHIFT) - MIN_CLASS_SHIFT) as usize)
}

fn class_of_capacity(cap: usize) -> Option<usize> {
    if !cap.is_power_of_two() {
        return None;
    }
    let shift = cap.trailing_zeros();
    (MIN_CLASS_SHIFT..=MAX_CLASS_SHIFT)
        .contains(&shift)
        .then(|| (shift - MIN_CLASS_SHIFT) as usize)
}

/// A byte buffer for one IO request; large ones return to the pool when dropped.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct IoBuf {
    v: Vec<u8>,
}

impl IoBuf {
    /// A buffer of exactly `len` bytes with unspecified contents (callers overwrite it all).
    pub fn with_len(len: usize) -> IoBuf {
        let Some(class) = class_of_len(len) else {
            return IoBuf { v: vec![0; len] };
        };
        let pooled = POOL
            .lock()
            .ok()
            .and_then(|mut p| p.get_mut(class).and_then(Vec::pop));
        // A fresh buffer comes zeroed from the allocator (large ones straight from the
        // kernel, whose pages are only backed once written): a request that announces a
        // large payload costs memory as its bytes arrive, not when its header does.
        let mut v = pooled.unwrap_or_else(|| vec![0; 1 << (class as u32 + MIN_CLASS_SHIFT)]);
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0);
        }
        IoBuf { v }
    }

    /// Wraps an existing vector (it joins the pool on drop only if its capacity fits a class).
    pub fn from_vec(v: Vec<u8>) -> IoBuf {
        IoBuf { v }
    }

    /// A buffer of `len` bytes that starts with `head` (at most `len` bytes of it); the caller
    /// fills the rest. When `head` holds it all (a small payload already read), it is one
    /// copy, never zeroed first.
    pub fn starting_with(head: &[u8], len: usize) -> IoBuf {
        if head.len() >= len {
            return IoBuf::from(&head[..len]);
        }
        let mut b = IoBuf::with_len(len);
        b[..head.len()].copy_from_slice(head);
        b
    }

    /// Takes the vector out; it will not return to the pool.
    pub fn into_vec(mut self) -> Vec<u8> {
        std::mem::take(&mut self.v)
    }
}

impl From<Vec<u8>> for IoBuf {
    fn from(v: Vec<u8>) -> IoBuf {
        IoBuf { v }
    }
}

impl From<&[u8]> for IoBuf {
    /// A copy of `s`; a small one straight from the allocator, never zeroed first.
    fn from(s: &[u8]) -> IoBuf {
        if class_of_len(s.len()).is_none() {
            return IoBuf { v: s.to_vec() };
        }
        let mut b = IoBuf::with_len(s.len());
        b.copy_from_slice(s);
        b
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.v
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.v
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let Some(class) = class_of_capacity(self.v.capacity()) else {
            return;
        };
        let v = std::mem::take(&mut self.v);
        if let Ok(mut pool) = POOL.lock() {
            let list = &mut pool[class];
            let per = (BYTES_PER_CLASS >> (class as u32 + MIN_CLASS_SHIFT)).clamp(2, PER_CLASS);
            if list.len() < per {
                list.push(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(class_of_len(4096), None);
        assert_eq!(class_of_len(65536), Some(0));
        assert_eq!(class_of_len(65537), Some(1));
        assert_eq!(class_of_len(1 << 20), Some(4));
        assert_eq!(class_of_len(32 << 20), Some(9));
        assert_eq!(class_of_len((32 << 20) + 1), None);
        assert_eq!(class_of_capacity(1 << 20), Some(4));
        assert_eq!(class_of_capacity(3 << 20), None);
    }

    #[test]
    fn buffers_have_the_asked_length_and_are_reused() {
        let mut a = IoBuf::with_len(100_000);
        assert_eq!(a.len(), 100_000);
        a.fill(7);
        let cap = a.v.capacity();
        assert_eq!(cap, 131072);
        drop(a);
        let b = IoBuf::with_len(70_000);
        assert_eq!(b.len(), 70_000);
        let c = IoBuf::with_len(10);
        assert_eq!(&c[..], &[0; 10]);
        let d = IoBuf::from(&b"abc"[..]);
        assert_eq!(&d[..], b"abc");
        assert_eq!(d.into_vec(), b"abc".to_vec());
    }
}
