//! Chunking files on disk, refusing to return a manifest for a file that
//! changed while it was read.

use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::chunking::{collect_chain, StreamCursor, DEFAULT_BUFFER_SIZE};
use crate::manifest::Manifest;
use crate::parallel;
use crate::params::ChunkParams;

/// Why a file could not be chunked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkFileError {
    /// The file could not be opened.
    #[error("could not open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Its metadata could not be read.
    #[error("could not stat {}", path.display())]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The path is a directory, device, socket…
    #[error("{} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    /// Reading the bytes failed.
    #[error("could not read {} at offset {offset}", path.display())]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// Size, mtime, ctime or identity changed between opening and the end
    /// of reading, or the bytes read differ from the size: the manifest
    /// would describe no version of the file, so none is returned.
    #[error("{} changed while it was being chunked", path.display())]
    ChangedWhileReading { path: PathBuf },
}

/// What we compare before and after reading. The ctime catches writes that
/// restore the mtime; the inode and device catch a rename over the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    dev: u64,
}

impl FileStamp {
    fn of(m: &Metadata) -> Self {
        FileStamp {
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        }
    }
}

/// An open regular file and its stamp at open time.
struct OpenedFile<'p> {
    path: &'p Path,
    file: File,
    before: FileStamp,
}

impl<'p> OpenedFile<'p> {
    fn open(path: &'p Path) -> Result<Self, ChunkFileError> {
        let file = File::open(path).map_err(|source| ChunkFileError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| ChunkFileError::Stat {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() {
            return Err(ChunkFileError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        Ok(OpenedFile {
            path,
            before: FileStamp::of(&meta),
            file,
        })
    }

    fn read_error(&self, offset: u64, source: io::Error) -> ChunkFileError {
        ChunkFileError::Read {
            path: self.path.to_path_buf(),
            offset,
            source,
        }
    }

    /// Accepts `manifest` only if the file, through our descriptor and
    /// through its path, looks exactly as it did when opened.
    fn verify_unchanged(&self, manifest: Manifest) -> Result<Manifest, ChunkFileError> {
        let changed = || ChunkFileError::ChangedWhileReading {
            path: self.path.to_path_buf(),
        };
        let stat_error = |source| ChunkFileError::Stat {
            path: self.path.to_path_buf(),
            source,
        };
        let by_fd = self.file.metadata().map_err(stat_error)?;
        let by_path = match fs::metadata(self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(changed()),
            Err(e) => return Err(stat_error(e)),
        };
        if FileStamp::of(&by_fd) != self.before
            || FileStamp::of(&by_path) != self.before
            || manifest.size() != self.before.size
        {
            return Err(changed());
        }
        Ok(manifest)
    }
}

/// Chunks and hashes a file, streaming through one 4 MiB buffer.
///
/// Returns [`ChunkFileError::ChangedWhileReading`] rather than a manifest
/// that matches no version of the file. Changes that keep size, mtime and
/// ctime identical (same clock tick) cannot be seen by any stat-based check.
pub fn chunk_file(path: &Path, params: ChunkParams) -> Result<Manifest, ChunkFileError> {
    let opened = OpenedFile::open(path)?;
    let buffer = buffer_for(opened.before.size);
    chunk_opened(opened, params, buffer, || {})
}

/// [`chunk_file`] with the cluster's `base` parameters scaled to the file's
/// size ([`ChunkParams::for_size`]), the size being the one seen when the
/// file was opened (a file that changes size meanwhile is refused anyway).
pub fn chunk_file_scaled(path: &Path, base: ChunkParams) -> Result<Manifest, ChunkFileError> {
    let opened = OpenedFile::open(path)?;
    let params = base.for_size(opened.before.size);
    let buffer = buffer_for(opened.before.size);
    chunk_opened(opened, params, buffer, || {})
}

/// The read buffer for a file of `size` bytes: no larger than the file (the
/// cursor raises it to what the chunk sizes need). A fresh 4 MiB buffer
/// zeroed for each of thousands of small files cost more than chunking them.
fn buffer_for(size: u64) -> usize {
    usize::try_from(size).map_or(DEFAULT_BUFFER_SIZE, |s| s.min(DEFAULT_BUFFER_SIZE))
}

/// [`chunk_file`] with a chosen buffer and a hook run once, after the first
/// read returned data (tests modify the file there, deterministically).
#[cfg(test)]
pub(crate) fn chunk_file_with_hook(
    path: &Path,
    params: ChunkParams,
    buffer_size: usize,
    hook: impl FnOnce(),
) -> Result<Manifest, ChunkFileError> {
    chunk_opened(OpenedFile::open(path)?, params, buffer_size, hook)
}

fn chunk_opened(
    opened: OpenedFile<'_>,
    params: ChunkParams,
    buffer_size: usize,
    hook: impl FnOnce(),
) -> Result<Manifest, ChunkFileError> {
    let reader = AfterFirstRead {
        inner: &opened.file,
        hook: Some(hook),
    };
    let mut cursor = StreamCursor::new(reader, 0, params, buffer_size);
    let chunks = collect_chain(&mut cursor).map_err(|e| opened.read_error(cursor.position(), e))?;
    opened.verify_unchanged(Manifest::from_chunks(params, chunks))
}

/// Runs a hook once, after the first read that returned data.
struct AfterFirstRead<R, F> {
    inner: R,
    hook: Option<F>,
}

impl<R: Read, F: FnOnce()> Read for AfterFirstRead<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            if let Some(hook) = self.hook.take() {
                hook();
            }
        }
        Ok(n)
    }
}

/// Reads `[pos, end)` of a file with positioned reads, so that several
/// threads can read one file through one descriptor.
pub(crate) struct SegmentReader<'f> {
    file: &'f File,
    pos: u64,
    end: u64,
}

impl Read for SegmentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.end.saturating_sub(self.pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Chunks a file on `threads` threads (0 = all available cores), each
/// reading its own segment with `read_at`. The manifest is identical to
/// [`chunk_file`]'s; memory is a few buffers per thread plus the manifest.
pub fn chunk_file_parallel(
    path: &Path,
    params: ChunkParams,
    threads: usize,
) -> Result<Manifest, ChunkFileError> {
    let opened = OpenedFile::open(path)?;
    let size = opened.before.size;
    let file = &opened.file;
    let cursor_at = |start: u64, buffer: usize| {
        StreamCursor::new(
            SegmentReader {
                file,
                pos: start,
                end: size,
            },
            start,
            params,
            buffer,
        )
    };
    let bounds = parallel::segment_bounds(size, params, threads);
    let chunks = match parallel::chunk_segments(size, &bounds, cursor_at) {
        Ok(Some(chunks)) => chunks,
        // No segment covers some offset: the file shrank under us.
        Ok(None) => {
            return Err(ChunkFileError::ChangedWhileReading {
                path: path.to_path_buf(),
            })
        }
        Err((offset, e)) => return Err(opened.read_error(offset, e)),
    };
    opened.verify_unchanged(Manifest::from_chunks(params, chunks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunking::tests::{pseudo_random, small_params};
    use crate::chunking::{chunk_slice, min_buffer_size};
    use std::ffi::OsStr;
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;

    fn must_write(dir: &Path, name: &OsStr, data: &[u8]) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, data).expect("write test file");
        path
    }

    #[test]
    fn zero_length_file_has_empty_manifest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = must_write(dir.path(), OsStr::new("empty"), &[]);
        for m in [
            chunk_file(&path, ChunkParams::default()).expect("chunk empty"),
            chunk_file_parallel(&path, ChunkParams::default(), 2).expect("chunk empty"),
        ] {
            assert_eq!(m.size(), 0);
            assert_eq!(m.chunk_count(), 0);
            assert_eq!(m.root(), synod_merkle::Hash::ZERO);
        }
    }

    #[test]
    fn sizes_at_the_params_edges() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = ChunkParams::default();
        let (min, avg, max) = (p.min() as usize, p.avg() as usize, p.max() as usize);
        for (len, fill) in [
            (min, 0u8),
            (avg, 1),
            (max, 2),
            (max + 1, 3),
            (min - 1, 4),
            (1, 5),
        ] {
            // Constant bytes: FastCDC finds no cut, so the chunking is forced.
            let data = vec![fill; len];
            let path = must_write(dir.path(), OsStr::new("edge"), &data);
            let m = chunk_file(&path, p).expect("chunk edge file");
            assert_eq!(m.size(), len as u64);
            assert_eq!(m, chunk_slice(&data, p), "len {len}");
            let lens: Vec<u32> = m.chunks().iter().map(|c| c.len).collect();
            let expected: Vec<u32> = if len == max + 1 {
                vec![max as u32, 1]
            } else {
                vec![len as u32]
            };
            assert_eq!(lens, expected, "len {len}");
            assert_eq!(m, chunk_file_parallel(&path, p, 2).expect("parallel"));
            // Random bytes of the same length agree with the slice path.
            let data = pseudo_random(len as u64, len);
            let path = must_write(dir.path(), OsStr::new("edge"), &data);
            assert_eq!(
                chunk_file(&path, p).expect("chunk edge file"),
                chunk_slice(&data, p)
            );
        }
    }

    #[test]
    fn scaled_chunking_reads_through_a_buffer_sized_to_the_file() {
        // Below, at and above the 4 MiB cap of the read buffer.
        let dir = tempfile::tempdir().expect("tempdir");
        let base = ChunkParams::default();
        for (seed, len) in [
            (1, 10_000),
            (2, 300_000),
            (3, DEFAULT_BUFFER_SIZE),
            (4, 5 << 20),
        ] {
            assert!(buffer_for(len as u64) <= DEFAULT_BUFFER_SIZE);
            let data = pseudo_random(seed, len);
            let path = must_write(dir.path(), OsStr::new("sized"), &data);
            let m = chunk_file_scaled(&path, base).expect("chunk");
            assert_eq!(
                m,
                chunk_slice(&data, base.for_size(len as u64)),
                "len {len}"
            );
        }
    }

    #[test]
    fn non_utf8_file_name_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = pseudo_random(9, 50_000);
        let path = must_write(dir.path(), OsStr::from_bytes(b"caf\xe9.bin"), &data);
        let m = chunk_file(&path, small_params()).expect("chunk non-utf8 name");
        assert_eq!(m, chunk_slice(&data, small_params()));
        let err = chunk_file(
            &dir.path().join(OsStr::from_bytes(b"caf\xe9.missing")),
            small_params(),
        )
        .expect_err("missing");
        assert!(err.to_string().contains("caf\u{FFFD}.missing"), "{err}");
    }

    #[test]
    fn unreadable_paths_name_the_path_and_cause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("no-such-file");
        let err = chunk_file(&missing, small_params()).expect_err("missing file");
        assert!(
            matches!(&err, ChunkFileError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
        assert!(
            err.to_string().contains(&*missing.to_string_lossy()),
            "{err}"
        );
        assert!(std::error::Error::source(&err).is_some());

        let err = chunk_file(dir.path(), small_params()).expect_err("a directory");
        assert!(matches!(&err, ChunkFileError::NotAFile { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("{} is not a regular file", dir.path().display())
        );
        let err = chunk_file_parallel(dir.path(), small_params(), 2).expect_err("a directory");
        assert!(matches!(&err, ChunkFileError::NotAFile { .. }), "{err:?}");
    }

    #[test]
    fn appending_while_chunking_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = small_params();
        let path = must_write(dir.path(), OsStr::new("growing"), &pseudo_random(4, 20_000));
        // Sanity: without interference the same call succeeds.
        chunk_file_with_hook(&path, p, min_buffer_size(p), || {}).expect("unchanged file");
        let err = chunk_file_with_hook(&path, p, min_buffer_size(p), || {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .expect("open for append");
            f.write_all(b"more bytes").expect("append");
        })
        .expect_err("file grew while being chunked");
        assert!(
            matches!(&err, ChunkFileError::ChangedWhileReading { path: p } if *p == path),
            "{err:?}"
        );
    }

    #[test]
    fn in_place_rewrite_while_chunking_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = small_params();
        let path = must_write(
            dir.path(),
            OsStr::new("rewritten"),
            &pseudo_random(5, 20_000),
        );
        let err = chunk_file_with_hook(&path, p, min_buffer_size(p), || {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open for write");
            f.write_all_at(b"XXXX", 100).expect("overwrite");
            // Same size; make the mtime differ even on a coarse clock.
            f.set_modified(std::time::SystemTime::UNIX_EPOCH)
                .expect("set mtime");
        })
        .expect_err("file rewritten while being chunked");
        assert!(
            matches!(err, ChunkFileError::ChangedWhileReading { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn replacing_the_file_while_chunking_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = small_params();
        let data = pseudo_random(6, 20_000);
        let path = must_write(dir.path(), OsStr::new("replaced"), &data);
        let err = chunk_file_with_hook(&path, p, min_buffer_size(p), || {
            let tmp = must_write(dir.path(), OsStr::new("new"), &data);
            fs::rename(&tmp, &path).expect("rename over");
        })
        .expect_err("file replaced while being chunked");
        assert!(
            matches!(err, ChunkFileError::ChangedWhileReading { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn parallel_file_equals_sequential() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = pseudo_random(8, 3 << 20);
        let path = must_write(dir.path(), OsStr::new("big"), &data);
        let p = ChunkParams::default();
        let seq = chunk_file(&path, p).expect("sequential");
        assert!(seq.chunk_count() > 30);
        for threads in [1, 2, 3, 7] {
            assert_eq!(
                chunk_file_parallel(&path, p, threads).expect("parallel"),
                seq
            );
        }
        let p = small_params();
        let seq = chunk_file(&path, p).expect("sequential");
        assert_eq!(chunk_file_parallel(&path, p, 5).expect("parallel"), seq);
    }

    /// Peak resident memory of this process (tests run one per process
    /// under nextest).
    fn peak_rss_kib() -> Option<u64> {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    #[test]
    fn five_gib_sparse_file_streams_in_bounded_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sparse");
        let size = 5u64 << 30;
        let f = File::create(&path).expect("create sparse file");
        f.write_all_at(b"synod", 3 << 30)
            .expect("write in the middle");
        f.set_len(size).expect("make sparse");
        drop(f);
        let p = ChunkParams::default();
        let m = chunk_file(&path, p).expect("chunk 5 GiB sparse file");
        assert_eq!(m.size(), size);
        // Zeros never cut: every chunk is max-size except around the write.
        assert!(m.chunk_count() >= (size / u64::from(p.max())) as usize);
        let zero_id = synod_merkle::Hash::of(&vec![0; p.max() as usize]);
        assert_eq!(m.chunks()[0].id, zero_id);
        let peak = peak_rss_kib().expect("VmHWM in /proc/self/status");
        eprintln!(
            "5 GiB sparse file: {} chunks, peak RSS {} KiB ({:.1} MiB)",
            m.chunk_count(),
            peak,
            peak as f64 / 1024.0
        );
        assert!(peak < 100 * 1024, "peak RSS {peak} KiB exceeds 100 MiB");
    }
}
