//! Byte buffers kept for reuse: received frame bodies and chunks read for a
//! push. Each lives only until its bytes are stored or sent, and a fresh
//! one per use cost page faults and zeroing on every megabyte that crossed
//! a node (a receiver of a 765 MiB replication faulted in all 765 MiB).

use std::sync::Mutex;

use bytes::Bytes;

/// Buffers smaller than this are plain allocations (cheap from the
/// allocator's small pages).
const POOLED_MIN: usize = 16 << 10;
/// Most bytes kept idle in the pool.
const POOL_BYTES: usize = 64 << 20;
/// A kept buffer serves a request at least this fraction of its size.
const FIT: usize = 4;

/// Idle buffers.
#[derive(Debug)]
pub struct Pool(Mutex<Idle>);

#[derive(Debug)]
struct Idle {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

/// The process's pool.
static POOL: Pool = Pool::new();

impl Pool {
    const fn new() -> Pool {
        Pool(Mutex::new(Idle {
            bufs: Vec::new(),
            bytes: 0,
        }))
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        // Nothing a panic could leave half done.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&'static self, len: usize) -> Buffer {
        if len >= POOLED_MIN {
            let mut idle = self.idle();
            if let Some(i) = idle
                .bufs
                .iter()
                .position(|b| b.len() >= len && b.len() / FIT <= len)
            {
                let buf = idle.bufs.swap_remove(i);
                idle.bytes -= buf.len();
                return Buffer {
                    buf,
                    len,
                    pool: self,
                };
            }
        }
        Buffer {
            buf: vec![0; len],
            len,
            pool: self,
        }
    }
}

/// `len` bytes to be overwritten (a reused buffer holds old bytes, never
/// uninitialized ones); back in the pool when dropped.
#[derive(Debug)]
pub struct Buffer {
    buf: Vec<u8>,
    len: usize,
    pool: &'static Pool,
}

impl Buffer {
    pub fn new(len: usize) -> Buffer {
        POOL.take(len)
    }

    /// The buffer as shared bytes; it returns to the pool when the last
    /// view of it goes.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let n = self.buf.len();
        if n < POOLED_MIN {
            return;
        }
        let mut idle = self.pool.idle();
        if idle.bytes + n <= POOL_BYTES {
            idle.bytes += n;
            idle.bufs.push(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_returns_when_its_last_view_goes_and_serves_a_fitting_request() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new()));
        let len = POOLED_MIN * 3 + 7;
        let mut a = pool.take(len);
        a.fill(0xAB);
        let at = a.buf.as_ptr();
        let bytes = Bytes::from_owner(a);
        assert_eq!(bytes.len(), len);
        let part = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.idle().bufs.len(), 0, "a view still holds it");
        drop(part);
        assert_eq!(pool.idle().bytes, len);
        let b = pool.take(len - 5);
        assert_eq!(b.buf.as_ptr(), at, "reused");
        assert_eq!(b.len(), len - 5, "sized to the request");
        assert!(b.iter().all(|&x| x == 0xAB), "old bytes, to be overwritten");
        drop(b);
        // Too small a request for it, or too large: a new buffer.
        assert_ne!(pool.take(len / FIT - 1).buf.as_ptr(), at);
        assert_ne!(pool.take(len + 1).buf.as_ptr(), at);
        assert_eq!(pool.take(100).len(), 100);
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_bytes() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new()));
        let each = 8 << 20;
        let held: Vec<Buffer> = (0..POOL_BYTES / each + 3)
            .map(|_| pool.take(each))
            .collect();
        drop(held);
        assert!(pool.idle().bytes <= POOL_BYTES);
        assert_eq!(pool.idle().bufs.len(), POOL_BYTES / each);
    }
}
