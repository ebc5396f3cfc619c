//! Byte blobs (chunk contents) that cross the codec without being copied.
//!
//! Decoding: while a frame is decoded, the frame's buffer is published to
//! this thread, and a blob whose bytes bincode hands out as a slice of that
//! buffer becomes a [`Bytes`] view of it instead of a copy.
//!
//! Encoding: while a frame is gathered, a large blob writes only its length
//! (bincode's standard config encodes a byte string as its length, as a
//! `u64`, followed by the bytes) and is recorded as a piece to be written
//! after the bytes encoded so far. The wire format is unchanged: the codec's
//! tests check gathered frames against plain bincode byte for byte.
//!
//! A decoded blob keeps its whole frame alive, so holders should not keep
//! them long (chunks are written out and dropped).

use std::cell::RefCell;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, Visitor};
use serde::{Serialize, Serializer};

/// Blobs below this size are copied inline: a separate write costs more.
const GATHER_MIN: usize = 1024;

thread_local! {
    static FRAME: RefCell<Option<Bytes>> = const { RefCell::new(None) };
    static GATHER: RefCell<Option<Gathered>> = const { RefCell::new(None) };
}

/// An encoded frame as pieces: `head` holds every byte bincode wrote, and
/// each blob is inserted at its offset in `head`.
#[derive(Default)]
pub(crate) struct Gathered {
    pub(crate) head: Vec<u8>,
    pub(crate) blobs: Vec<(usize, Bytes)>,
}

impl Gathered {
    /// Total length of the frame.
    pub(crate) fn len(&self) -> usize {
        self.head.len() + self.blobs.iter().map(|(_, b)| b.len()).sum::<usize>()
    }

    /// The pieces in wire order (empty pieces left out).
    pub(crate) fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        let mut at = 0;
        let mut out = Vec::with_capacity(2 * self.blobs.len() + 1);
        for (offset, blob) in &self.blobs {
            out.push(&self.head[at..*offset]);
            out.push(&blob[..]);
            at = *offset;
        }
        out.push(&self.head[at..]);
        out.into_iter().filter(|p| !p.is_empty())
    }

    /// The frame as one buffer.
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        for p in self.pieces() {
            v.extend_from_slice(p);
        }
        v
    }
}

/// Runs `encode` with blobs gathered; `head` starts as given.
pub(crate) fn gather<E>(
    head: Vec<u8>,
    encode: impl FnOnce() -> Result<(), E>,
) -> Result<Gathered, E> {
    struct Reset(Option<Gathered>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.0.take();
            GATHER.with(|g| *g.borrow_mut() = prev);
        }
    }
    let prev = GATHER.with(|g| {
        g.borrow_mut().replace(Gathered {
            head,
            blobs: Vec::new(),
        })
    });
    let reset = Reset(prev);
    let res = encode();
    let gathered = GATHER.with(|g| g.borrow_mut().take()).unwrap_or_default();
    drop(reset);
    res.map(|()| gathered)
}

/// The bincode writer of a gather: appends to the gathered head.
pub(crate) struct GatherWriter;

impl bincode::enc::write::Writer for GatherWriter {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        GATHER.with(|g| match g.borrow_mut().as_mut() {
            Some(gathered) => {
                gathered.head.extend_from_slice(bytes);
                Ok(())
            }
            None => Err(bincode::error::EncodeError::Other(
                "gather writer used outside a gather",
            )),
        })
    }
}

/// Runs `decode` with `frame` published, so blobs inside it are shared.
pub(crate) fn with_frame<T>(frame: &Bytes, decode: impl FnOnce() -> T) -> T {
    struct Reset(Option<Bytes>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.0.take();
            FRAME.with(|f| *f.borrow_mut() = prev);
        }
    }
    let prev = FRAME.with(|f| f.borrow_mut().replace(frame.clone()));
    let _reset = Reset(prev);
    decode()
}

fn shared_or_copied(v: &[u8]) -> Bytes {
    FRAME.with(|f| {
        let f = f.borrow();
        match f.as_ref() {
            Some(frame) if within(frame, v) => frame.slice_ref(v),
            _ => Bytes::copy_from_slice(v),
        }
    })
}

fn within(frame: &[u8], v: &[u8]) -> bool {
    let (start, end) = (
        frame.as_ptr() as usize,
        frame.as_ptr() as usize + frame.len(),
    );
    let (vs, ve) = (v.as_ptr() as usize, v.as_ptr() as usize + v.len());
    !v.is_empty() && vs >= start && ve <= end
}

/// `#[serde(with = "…::blob")]` for a `Bytes` field.
pub fn serialize<S: Serializer>(bytes: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    if bytes.len() >= GATHER_MIN && GATHER.with(|g| g.borrow().is_some()) {
        // The length now, the bytes as a piece of their own at this offset.
        let ok = s.serialize_u64(bytes.len() as u64)?;
        GATHER.with(|g| {
            if let Some(gathered) = g.borrow_mut().as_mut() {
                let at = gathered.head.len();
                gathered.blobs.push((at, bytes.clone()));
            }
        });
        Ok(ok)
    } else {
        s.serialize_bytes(bytes)
    }
}

/// `#[serde(with = "…::blob")]` for a `Bytes` field.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
    d.deserialize_bytes(BlobVisitor)
}

struct BlobVisitor;

impl<'de> Visitor<'de> for BlobVisitor {
    type Value = Bytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Bytes, E> {
        Ok(shared_or_copied(v))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
        Ok(Bytes::copy_from_slice(v))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes::from(v))
    }
}

/// `#[serde(with = "…::blob::option")]` for an `Option<Bytes>` field.
pub mod option {
    use super::*;

    struct Some_<'a>(&'a Bytes);

    impl Serialize for Some_<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            super::serialize(self.0, s)
        }
    }

    pub fn serialize<S: Serializer>(bytes: &Option<Bytes>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_some(&Some_(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
        d.deserialize_option(OptionVisitor)
    }

    struct OptionVisitor;

    impl<'de> Visitor<'de> for OptionVisitor {
        type Value = Option<Bytes>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an optional byte string")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}
