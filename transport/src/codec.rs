//! The one place that frames and decodes every wire message.
//!
//! A frame is a `u32` big-endian body length followed by the bincode 2
//! (serde, standard config) body. The length is checked against the message
//! type's hard limit before anything is allocated, the body is read into one
//! buffer of exactly that size, bincode decodes with `with_limit` (a claimed
//! length beyond the limit is an error, not an allocation) and the whole body
//! must be consumed. Every rejection is counted in [`CodecMetrics`].

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::buffers::Buffer;
use crate::messages::WireProtocol;

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// Which side of an exchange a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Request => "request",
            Direction::Response => "response",
        })
    }
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("{protocol} {direction} of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        protocol: &'static str,
        direction: Direction,
        len: u64,
        limit: usize,
    },
    #[error("{protocol} {direction} ended after {got} of {expected} bytes")]
    Truncated {
        protocol: &'static str,
        direction: Direction,
        got: usize,
        expected: usize,
    },
    #[error("{protocol} {direction} cannot be decoded (limit {limit} bytes): {reason}")]
    Malformed {
        protocol: &'static str,
        direction: Direction,
        limit: usize,
        reason: String,
    },
    #[error("{protocol} {direction} has {extra} bytes after the message")]
    Trailing {
        protocol: &'static str,
        direction: Direction,
        extra: usize,
    },
    #[error("{protocol} {direction} cannot be encoded: {reason}")]
    Encode {
        protocol: &'static str,
        direction: Direction,
        reason: String,
    },
}

/// Counters of rejected frames, shared by every codec of a transport.
#[derive(Debug, Default)]
pub struct CodecMetrics {
    oversized: AtomicU64,
    truncated: AtomicU64,
    malformed: AtomicU64,
    unsendable: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CodecCounts {
    /// Frames whose length prefix exceeded the limit.
    pub oversized: u64,
    /// Frames that ended early.
    pub truncated: u64,
    /// Frames that did not decode or had trailing bytes.
    pub malformed: u64,
    /// Our own messages that were too large or failed to encode.
    pub unsendable: u64,
    /// Frame bytes (headers included) received whole, every protocol.
    pub bytes_in: u64,
    /// Frame bytes (headers included) sent, every protocol.
    pub bytes_out: u64,
}

impl CodecCounts {
    /// All frames received and rejected.
    pub fn rejected(&self) -> u64 {
        self.oversized + self.truncated + self.malformed
    }
}

impl CodecMetrics {
    /// The current counts.
    pub fn snapshot(&self) -> CodecCounts {
        CodecCounts {
            oversized: self.oversized.load(Ordering::Relaxed),
            truncated: self.truncated.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            unsendable: self.unsendable.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }

    fn count(&self, err: &CodecError) {
        let counter = match err {
            CodecError::TooLarge { .. } => &self.oversized,
            CodecError::Truncated { .. } => &self.truncated,
            CodecError::Malformed { .. } | CodecError::Trailing { .. } => &self.malformed,
            CodecError::Encode { .. } => &self.unsendable,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(cause = %err, "wire frame rejected");
    }
}

/// Encodes `msg` as one frame (header included), refusing a body over `limit`.
pub fn encode_frame<T: Serialize>(
    msg: &T,
    protocol: &'static str,
    direction: Direction,
    limit: usize,
) -> Result<Vec<u8>, CodecError> {
    encode_gathered(msg, protocol, direction, limit).map(|g| g.to_vec())
}

/// Encodes `msg` as one frame whose large blobs stay where they are (see
/// [`blob`]), refusing a body over `limit`.
pub(crate) fn encode_gathered<T: Serialize>(
    msg: &T,
    protocol: &'static str,
    direction: Direction,
    limit: usize,
) -> Result<blob::Gathered, CodecError> {
    let mut gathered = blob::gather(vec![0u8; HEADER_LEN], || {
        bincode::serde::encode_into_writer(msg, blob::GatherWriter, bincode::config::standard())
    })
    .map_err(|e| CodecError::Encode {
        protocol,
        direction,
        reason: e.to_string(),
    })?;
    let len = gathered.len() - HEADER_LEN;
    if len > limit {
        return Err(CodecError::TooLarge {
            protocol,
            direction,
            len: len as u64,
            limit,
        });
    }
    let len = u32::try_from(len).expect("limits are below 4 GiB");
    gathered.head[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(gathered)
}

/// Checks a frame header against `limit` and returns the body length.
pub fn check_header(
    header: [u8; HEADER_LEN],
    protocol: &'static str,
    direction: Direction,
    limit: usize,
) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        return Err(CodecError::TooLarge {
            protocol,
            direction,
            len: len as u64,
            limit,
        });
    }
    Ok(len)
}

/// Decodes a whole frame (header included) held in memory.
pub fn decode_frame<T: DeserializeOwned>(
    frame: &[u8],
    protocol: &'static str,
    direction: Direction,
    limit: usize,
) -> Result<T, CodecError> {
    let header: [u8; HEADER_LEN] = frame
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(CodecError::Truncated {
            protocol,
            direction,
            got: frame.len(),
            expected: HEADER_LEN,
        })?;
    let len = check_header(header, protocol, direction, limit)?;
    let body = &frame[HEADER_LEN..];
    if body.len() < len {
        return Err(CodecError::Truncated {
            protocol,
            direction,
            got: body.len(),
            expected: len,
        });
    }
    if body.len() > len {
        return Err(CodecError::Trailing {
            protocol,
            direction,
            extra: body.len() - len,
        });
    }
    decode_body(body, protocol, direction, limit)
}

/// Decodes a received frame body whose length was already checked against
/// `limit`; its blobs are views of `body`, not copies.
pub(crate) fn decode_shared<T: DeserializeOwned>(
    body: &Bytes,
    protocol: &'static str,
    direction: Direction,
    limit: usize,
) -> Result<T, CodecError> {
    blob::with_frame(body, || decode_body(body, protocol, direction, limit))
}

/// Decodes a frame body whose length was already checked against `limit`.
pub fn decode_body<T: DeserializeOwned>(
    body: &[u8],
    protocol: &'static str,
    direction: Direction,
    limit: usize,
) -> Result<T, CodecError> {
    let (msg, used) = decode_limited::<T>(body, limit).map_err(|e| CodecError::Malformed {
        protocol,
        direction,
        limit,
        reason: e.to_string(),
    })?;
    if used != body.len() {
        return Err(CodecError::Trailing {
            protocol,
            direction,
            extra: body.len() - used,
        });
    }
    Ok(msg)
}

/// bincode's limit is a const generic, so limits are rounded up to one of a
/// few buckets; the length prefix has already enforced the exact limit, the
/// bucket bounds what a lying length field inside the body can claim.
fn decode_limited<T: DeserializeOwned>(
    body: &[u8],
    limit: usize,
) -> Result<(T, usize), bincode::error::DecodeError> {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;
    fn with<T: DeserializeOwned, const N: usize>(
        body: &[u8],
    ) -> Result<(T, usize), bincode::error::DecodeError> {
        // The borrowing decoder hands byte strings out as slices of `body`,
        // which blobs turn into shared views (see `blob`).
        bincode::serde::borrow_decode_from_slice(
            body,
            bincode::config::standard().with_limit::<N>(),
        )
    }
    match limit {
        l if l <= 4 * KIB => with::<T, { 4 * KIB }>(body),
        l if l <= 64 * KIB => with::<T, { 64 * KIB }>(body),
        l if l <= MIB => with::<T, { MIB }>(body),
        l if l <= 4 * MIB => with::<T, { 4 * MIB }>(body),
        l if l <= 9 * MIB => with::<T, { 9 * MIB }>(body),
        _ => with::<T, { 16 * MIB }>(body),
    }
}

/// Reads one frame from `io`; allocates at most the type's limit.
pub async fn read_frame<T, R>(
    io: &mut R,
    protocol: &'static str,
    direction: Direction,
    limit: usize,
    metrics: &CodecMetrics,
) -> io::Result<T>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    match read_next_frame(io, protocol, direction, limit, metrics).await? {
        Some(msg) => Ok(msg),
        None => {
            let err = CodecError::Truncated {
                protocol,
                direction,
                got: 0,
                expected: HEADER_LEN,
            };
            metrics.count(&err);
            Err(io::Error::new(io::ErrorKind::InvalidData, err))
        }
    }
}

/// [`read_frame`] of a stream that carries frames one after another:
/// `None` if it ends cleanly before the next frame.
pub async fn read_next_frame<T, R>(
    io: &mut R,
    protocol: &'static str,
    direction: Direction,
    limit: usize,
    metrics: &CodecMetrics,
) -> io::Result<Option<T>>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let reject = |err: CodecError| {
        metrics.count(&err);
        io::Error::new(io::ErrorKind::InvalidData, err)
    };
    let truncated = |got: usize, expected: usize| {
        reject(CodecError::Truncated {
            protocol,
            direction,
            got,
            expected,
        })
    };
    let mut header = [0u8; HEADER_LEN];
    match fill(io, &mut header).await? {
        Ok(()) => {}
        Err(0) => return Ok(None),
        Err(got) => return Err(truncated(got, HEADER_LEN)),
    }
    let len = check_header(header, protocol, direction, limit).map_err(reject)?;
    // The claim is already within this type's hard limit, so reserving it is
    // bounded. Read straight into the final buffer (futures' `read_to_end`
    // zero-fills every growth step), one kept for reuse (see `buffers`).
    let mut body = Buffer::new(len);
    if let Err(got) = fill(io, &mut body).await? {
        return Err(truncated(got, len));
    }
    metrics
        .bytes_in
        .fetch_add((HEADER_LEN + len) as u64, Ordering::Relaxed);
    decode_shared(&body.into_bytes(), protocol, direction, limit)
        .map(Some)
        .map_err(reject)
}

/// Fills `buf` from `io`; `Ok(Err(got))` if the stream ended after `got` bytes.
async fn fill<R: AsyncRead + Unpin>(io: &mut R, buf: &mut [u8]) -> io::Result<Result<(), usize>> {
    let mut got = 0;
    while got < buf.len() {
        match io.read(&mut buf[got..]).await? {
            0 => return Ok(Err(got)),
            n => got += n,
        }
    }
    Ok(Ok(()))
}

/// Writes one frame to `io`. The message is encoded before the first
/// await, so the future does not hold a reference to it; large blobs are
/// written from where they are, not copied into the frame.
pub fn write_frame<'a, T, W>(
    io: &'a mut W,
    msg: &T,
    protocol: &'static str,
    direction: Direction,
    limit: usize,
    metrics: &'a CodecMetrics,
) -> impl std::future::Future<Output = io::Result<()>> + Send + 'a
where
    T: Serialize,
    W: AsyncWrite + Unpin + Send,
{
    let frame = encode_gathered(msg, protocol, direction, limit).map_err(|err| {
        metrics.count(&err);
        io::Error::new(io::ErrorKind::InvalidInput, err)
    });
    async move {
        let frame = frame?;
        for piece in frame.pieces() {
            io.write_all(piece).await?;
        }
        metrics
            .bytes_out
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        io.flush().await
    }
}

/// The request_response codec of protocol `P`.
pub struct WireCodec<P> {
    metrics: Arc<CodecMetrics>,
    _protocol: PhantomData<fn() -> P>,
}

impl<P> WireCodec<P> {
    /// A codec counting its rejections in `metrics`.
    pub fn new(metrics: Arc<CodecMetrics>) -> Self {
        WireCodec {
            metrics,
            _protocol: PhantomData,
        }
    }
}

impl<P> Clone for WireCodec<P> {
    fn clone(&self) -> Self {
        WireCodec::new(self.metrics.clone())
    }
}

impl<P: WireProtocol> fmt::Debug for WireCodec<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WireCodec({})", P::NAME)
    }
}

impl<P: WireProtocol> libp2p::request_response::Codec for WireCodec<P> {
    type Protocol = StreamProtocol;
    type Request = P::Request;
    type Response = P::Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<P::Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(
            io,
            P::NAME,
            Direction::Request,
            P::REQUEST_LIMIT,
            &self.metrics,
        )
        .await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<P::Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(
            io,
            P::NAME,
            Direction::Response,
            P::RESPONSE_LIMIT,
            &self.metrics,
        )
        .await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: P::Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(
            io,
            &req,
            P::NAME,
            Direction::Request,
            P::REQUEST_LIMIT,
            &self.metrics,
        )
        .await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: P::Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(
            io,
            &resp,
            P::NAME,
            Direction::Response,
            P::RESPONSE_LIMIT,
            &self.metrics,
        )
        .await
    }
}

pub(crate) mod blob;

#[cfg(test)]
mod tests;
