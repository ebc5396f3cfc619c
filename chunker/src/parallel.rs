//! Chunking one large input on several threads, with exactly the cuts the
//! sequential chunker makes.
//!
//! The input is split into segments; thread k chunks and hashes from the
//! start of its segment as if it were the start of the data. Its cuts are
//! wrong at first, but FastCDC is deterministic from any cut on: once two
//! chains share a cut, they share every later one. So thread k (except the
//! last) chunks past its segment's end until it reaches a cut that the chain
//! of segment k+1 also makes (it probes that chain itself, cut-only, so the
//! threads never wait on each other), and stops there. The merge then walks
//! the true chain: it starts in segment 0 and, at each segment's end (a cut
//! shared with the next chain), continues in the first later segment whose
//! chain has a chunk starting there. A segment shorter than one chunk is
//! simply overrun: the chain of the previous segment continues into the next
//! one, and so on.

use std::io;
use std::num::NonZeroUsize;
use std::thread;

use synod_merkle::Hash;

use crate::chunking::{chunk_slice, ChunkCursor, SliceCursor, DEFAULT_BUFFER_SIZE};
use crate::manifest::{ChunkRef, Manifest};
use crate::params::ChunkParams;

/// Segments shorter than this many max-size chunks are not worth a thread.
const MIN_SEGMENT_CHUNKS: u64 = 4;

/// Segment starts for `threads` threads (0 = all cores): the first is 0,
/// the others are multiples of `params.max()`, so runs of constant bytes
/// (which cut every `max` bytes) resynchronize at once.
pub(crate) fn segment_bounds(size: u64, params: ChunkParams, threads: usize) -> Vec<u64> {
    if size == 0 {
        return Vec::new();
    }
    let threads = if threads == 0 {
        thread::available_parallelism().map_or(1, NonZeroUsize::get)
    } else {
        threads
    };
    let max = u64::from(params.max());
    let worth = (size / (MIN_SEGMENT_CHUNKS * max)).max(1);
    let threads = (threads as u64).min(worth);
    let mut starts: Vec<u64> = (0..threads)
        .map(|k| {
            let raw = u128::from(size) * u128::from(k) / u128::from(threads);
            // raw < size, so it fits in u64.
            (raw as u64) / max * max
        })
        .collect();
    starts.dedup();
    starts
}

/// The chunks one thread produced: a chain from `start`, contiguous.
#[derive(Debug)]
struct Segment {
    start: u64,
    chunks: Vec<ChunkRef>,
}

impl Segment {
    fn end(&self) -> u64 {
        self.chunks.last().map_or(self.start, ChunkRef::end)
    }
}

/// Chunks from `start` until a cut shared with the chain from `next_start`
/// (or to the end of the data for the last segment).
fn run_segment<C: ChunkCursor>(
    start: u64,
    next_start: Option<u64>,
    cursor_at: &(impl Fn(u64, usize) -> C + Sync),
) -> Result<Segment, (u64, io::Error)> {
    let mut own = cursor_at(start, DEFAULT_BUFFER_SIZE);
    let mut chunks = Vec::new();
    let mut pos = start;
    // The probe walks the next segment's chain; `probe_pos` is its latest cut.
    let mut probe: Option<C> = None;
    let mut probe_pos = next_start.unwrap_or(u64::MAX);
    let mut probe_ended = false;
    while let Some((offset, bytes)) = own.next_chunk().map_err(|e| (pos, e))? {
        chunks.push(ChunkRef::new(Hash::of(bytes), offset, bytes.len()));
        pos = offset + bytes.len() as u64;
        let Some(next) = next_start else { continue };
        if pos < next {
            continue;
        }
        let probe = probe.get_or_insert_with(|| cursor_at(next, 0));
        while probe_pos < pos && !probe_ended {
            match probe.next_chunk().map_err(|e| (probe_pos, e))? {
                Some((o, b)) => probe_pos = o + b.len() as u64,
                None => probe_ended = true,
            }
        }
        if probe_pos == pos {
            break;
        }
    }
    Ok(Segment { start, chunks })
}

/// Runs one thread per segment start and merges their chains. `Ok(None)`
/// means some offset below `size` is covered by no chain, which happens
/// only if the input ended early (a file that shrank).
pub(crate) fn chunk_segments<C: ChunkCursor>(
    size: u64,
    starts: &[u64],
    cursor_at: impl Fn(u64, usize) -> C + Sync,
) -> Result<Option<Vec<ChunkRef>>, (u64, io::Error)> {
    debug_assert!(starts.first().is_none_or(|&s| s == 0));
    debug_assert!(starts.windows(2).all(|w| w[0] < w[1]));
    let next_of = |k: usize| starts.get(k + 1).copied();
    let segments = thread::scope(|scope| {
        let cursor_at = &cursor_at;
        let handles: Vec<_> = (1..starts.len())
            .map(|k| scope.spawn(move || run_segment(starts[k], next_of(k), cursor_at)))
            .collect();
        let mut segments = Vec::with_capacity(starts.len());
        if let Some(&first) = starts.first() {
            segments.push(run_segment(first, next_of(0), cursor_at));
        }
        for h in handles {
            segments.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        segments
    });
    let segments = segments.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(merge(size, segments))
}

/// Follows the true chain (the one from offset 0) through the segments.
fn merge(size: u64, segments: Vec<Segment>) -> Option<Vec<ChunkRef>> {
    let total = segments.iter().map(|s| s.chunks.len()).sum();
    let mut out = Vec::with_capacity(total);
    let mut pos = 0;
    let mut segments = segments.into_iter();
    while pos < size {
        let seg = segments.by_ref().find(|s| s.end() > pos)?;
        if seg.start > pos {
            return None;
        }
        // `pos` is a cut of this chain (see the module docs).
        let i = seg.chunks.binary_search_by_key(&pos, |c| c.offset).ok()?;
        pos = seg.end();
        out.extend_from_slice(&seg.chunks[i..]);
    }
    Some(out)
}

/// Chunks and hashes an in-memory buffer on `threads` threads (0 = all
/// cores); the manifest is identical to [`chunk_slice`]'s.
pub fn chunk_slice_parallel(data: &[u8], params: ChunkParams, threads: usize) -> Manifest {
    let starts = segment_bounds(data.len() as u64, params, threads);
    match try_chunk_slice_segments(data, params, &starts) {
        Some(chunks) => Manifest::from_chunks(params, chunks),
        None => {
            // Cannot happen for a slice (it cannot shrink); stay correct anyway.
            tracing::error!("parallel chunk merge found a gap; chunking sequentially");
            chunk_slice(data, params)
        }
    }
}

/// Parallel chunking of a slice from explicit segment starts (tests use
/// arbitrary, even tiny, segments).
pub(crate) fn try_chunk_slice_segments(
    data: &[u8],
    params: ChunkParams,
    starts: &[u64],
) -> Option<Vec<ChunkRef>> {
    chunk_segments(data.len() as u64, starts, |start, _| {
        // Segment starts lie within the slice, so they fit in usize.
        SliceCursor::new(data, usize::try_from(start).unwrap_or(usize::MAX), params)
    })
    .expect("slice cursors never fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunking::tests::{pseudo_random, small_params};
    use proptest::prelude::*;

    fn data_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..4000),
                (0..4000usize, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
            ],
            1..6,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn parallel_equals_sequential_for_any_segments(
            data in data_strategy(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let p = small_params();
            let seq = chunk_slice(&data, p);
            let mut starts: Vec<u64> = cuts.iter().map(|i| i.index(data.len().max(1)) as u64).collect();
            starts.push(0);
            starts.sort_unstable();
            starts.dedup();
            if data.is_empty() {
                starts.clear();
            }
            let chunks = try_chunk_slice_segments(&data, p, &starts);
            prop_assert!(chunks.is_some(), "merge found a gap for starts {:?}", starts);
            prop_assert_eq!(Manifest::from_chunks(p, chunks.unwrap_or_default()), seq);
        }

        #[test]
        fn parallel_equals_sequential_for_thread_counts(
            data in data_strategy(),
            threads in 0usize..9,
        ) {
            let p = small_params();
            prop_assert_eq!(chunk_slice_parallel(&data, p, threads), chunk_slice(&data, p));
        }
    }

    #[test]
    fn tiny_segments_without_cuts_are_chained() {
        let p = small_params();
        let data = pseudo_random(11, 20_000);
        // Segments of 1..=40 bytes, far below min (64): none of them cuts
        // inside itself, so each chain overruns several segments.
        let mut starts = vec![0u64];
        let mut s = 0u64;
        let mut k = 1;
        while s + k < 6000 {
            s += k;
            starts.push(s);
            k = k % 40 + 1;
        }
        let chunks = try_chunk_slice_segments(&data, p, &starts).expect("no gap");
        assert_eq!(Manifest::from_chunks(p, chunks), chunk_slice(&data, p));
    }

    #[test]
    fn large_input_with_default_params() {
        let p = ChunkParams::default();
        let data = pseudo_random(12, 8 << 20);
        let seq = chunk_slice(&data, p);
        for threads in [2, 3, 4] {
            assert!(segment_bounds(data.len() as u64, p, threads).len() > 1);
            assert_eq!(
                chunk_slice_parallel(&data, p, threads),
                seq,
                "{threads} threads"
            );
        }
        // Constant bytes: every chunk is max-size; aligned segments resync.
        let zeros = vec![0u8; 8 << 20];
        assert_eq!(chunk_slice_parallel(&zeros, p, 3), chunk_slice(&zeros, p));
    }

    #[test]
    fn segment_bounds_are_aligned_and_increasing() {
        let p = ChunkParams::default();
        assert!(segment_bounds(0, p, 4).is_empty());
        assert_eq!(segment_bounds(1000, p, 4), vec![0]);
        let b = segment_bounds(1 << 30, p, 3);
        assert_eq!(b.len(), 3);
        assert!(b.iter().all(|s| s % u64::from(p.max()) == 0));
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }
}
