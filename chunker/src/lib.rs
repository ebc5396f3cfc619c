//! Content-defined chunking for synod: it owns how a file's bytes become
//! chunks (FastCDC 2020 with cluster-wide [`ChunkParams`]), chunk ids (the
//! BLAKE3 of the bytes), the file [`Manifest`] (ordered chunk refs, size,
//! Merkle root over the ids) with its wire form, and the local
//! [`ChunkIndex`] that maps chunk ids to the bytes on disk that hold them.
//! No networking, no Raft; every function here is blocking, so async
//! callers run it on a blocking thread.
//!
//! Cut points are part of the on-disk and wire format: the test vectors in
//! `tests/vectors.rs` pin them.
//!
//! Layout:
//! - `params`: [`ChunkParams`], always-valid min/avg/max sizes, and their
//!   scaling to a file's size ([`ChunkParams::for_size`]: smaller chunks for
//!   small files; the `*_scaled` functions apply it).
//! - `chunking`: the FastCDC cutter, streaming over any `Read` in bounded
//!   memory ([`chunk_reader`]) and over slices ([`chunk_slice`]).
//! - `file`: [`chunk_file`] and [`chunk_file_parallel`], which refuse files
//!   that change while being read.
//! - `parallel`: multi-threaded chunking with resynchronization
//!   ([`chunk_slice_parallel`]), identical to the sequential result.
//! - `manifest`: [`Manifest`], [`ChunkRef`], the blob wire form.
//! - `index`: [`ChunkIndex`] on sled, verified reads.

#[cfg(not(unix))]
compile_error!("synod-chunker supports unix only (positioned reads, raw path bytes)");

mod chunking;
mod file;
mod index;
mod manifest;
mod parallel;
mod params;

pub use chunking::{chunk_reader, chunk_slice, chunk_slice_scaled, ChunkError};
pub use file::{chunk_file, chunk_file_parallel, chunk_file_scaled, ChunkFileError};
pub use index::{ChunkIndex, ChunkLocation, ChunkReadError, IndexError};
pub use manifest::{ChunkRef, Manifest, ManifestError};
pub use parallel::chunk_slice_parallel;
pub use params::{
    ChunkParams, ChunkParamsError, AVG_BOUNDS, MAX_BOUNDS, MIN_BOUNDS, SCALE_CHUNKS, SCALE_MIN_AVG,
};
pub use synod_merkle::Hash;
