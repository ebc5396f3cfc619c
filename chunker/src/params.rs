//! Chunking parameters: the only sizes the chunker accepts.

use serde::{Deserialize, Serialize};

/// Bounds that fastcdc 5's v2020 chunker supports. It checks them only with
/// `debug_assert!`, so a release build would silently accept anything; we
/// check them always (`fastcdc-5.0.0/src/v2020/mod.rs:55-65`).
pub const MIN_BOUNDS: (u32, u32) = (64, 1 << 20);
/// Bounds of the average chunk size.
pub const AVG_BOUNDS: (u32, u32) = (256, 4 << 20);
/// Bounds of the maximum chunk size.
pub const MAX_BOUNDS: (u32, u32) = (1 << 10, 16 << 20);

/// Minimum, average and maximum chunk size of FastCDC (2020, normalization
/// level 1, no seed). Cut points depend on them, so they are part of the
/// on-disk and wire format: every manifest records the params it was cut with.
///
/// A value of this type is always valid: all sizes even and within fastcdc's
/// bounds, `min < avg < max`, and `avg` a power of two (so FastCDC's masks
/// match the average exactly). Deserialization re-validates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawChunkParams")]
pub struct ChunkParams {
    min: u32,
    avg: u32,
    max: u32,
}

/// The unchecked shape of [`ChunkParams`] as it appears in serialized form.
#[derive(Deserialize)]
struct RawChunkParams {
    min: u32,
    avg: u32,
    max: u32,
}

impl TryFrom<RawChunkParams> for ChunkParams {
    type Error = ChunkParamsError;

    fn try_from(raw: RawChunkParams) -> Result<Self, Self::Error> {
        ChunkParams::new(raw.min, raw.avg, raw.max)
    }
}

/// Why a triple of sizes is not usable as [`ChunkParams`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkParamsError {
    /// A size is odd (fastcdc 5 would silently shift cut points).
    #[error("chunk {which} size {value} is odd; chunk sizes must be even")]
    Odd { which: &'static str, value: u32 },
    /// A size lies outside fastcdc's supported range.
    #[error("chunk {which} size {value} is out of range {lo}..={hi}")]
    OutOfRange {
        which: &'static str,
        value: u32,
        lo: u32,
        hi: u32,
    },
    /// The average is not a power of two.
    #[error("average chunk size {avg} is not a power of two")]
    AvgNotPowerOfTwo { avg: u32 },
    /// The sizes are not strictly increasing.
    #[error("chunk sizes must satisfy min < avg < max, got min {min}, avg {avg}, max {max}")]
    NotIncreasing { min: u32, avg: u32, max: u32 },
}

impl ChunkParams {
    /// The cluster default: 16 KiB / 64 KiB / 256 KiB.
    pub const DEFAULT: ChunkParams = ChunkParams {
        min: 16 << 10,
        avg: 64 << 10,
        max: 256 << 10,
    };

    /// Checks and builds parameters; the error names the offending value.
    pub fn new(min: u32, avg: u32, max: u32) -> Result<Self, ChunkParamsError> {
        for (which, value, (lo, hi)) in [
            ("minimum", min, MIN_BOUNDS),
            ("average", avg, AVG_BOUNDS),
            ("maximum", max, MAX_BOUNDS),
        ] {
            if !value.is_multiple_of(2) {
                return Err(ChunkParamsError::Odd { which, value });
            }
            if !(lo..=hi).contains(&value) {
                return Err(ChunkParamsError::OutOfRange {
                    which,
                    value,
                    lo,
                    hi,
                });
            }
        }
        if !avg.is_power_of_two() {
            return Err(ChunkParamsError::AvgNotPowerOfTwo { avg });
        }
        if !(min < avg && avg < max) {
            return Err(ChunkParamsError::NotIncreasing { min, avg, max });
        }
        Ok(ChunkParams { min, avg, max })
    }

    /// Minimum chunk size in bytes (only the last chunk of a file may be smaller).
    pub fn min(&self) -> u32 {
        self.min
    }

    /// Target average chunk size in bytes (the real mean is about 1.2× this).
    pub fn avg(&self) -> u32 {
        self.avg
    }

    /// Maximum chunk size in bytes.
    pub fn max(&self) -> u32 {
        self.max
    }
}

/// A file gets at least this many average chunks before its parameters
/// stop shrinking (see [`ChunkParams::for_size`]).
///
/// Two, not more: every chunk costs an id, an index record, a staging slot
/// and a hash call on each node, and a small edit no longer needs small
/// chunks to stay small on the wire, since a changed chunk travels as a
/// delta against the one it replaces. With 16, 2,000 files of 1-256 KiB
/// were cut into 37,000 chunks and replicated about 15 % slower.
pub const SCALE_CHUNKS: u64 = 2;
/// The smallest average chunk size scaling goes down to: below it, the ids
/// and per-chunk bookkeeping outweigh what a smaller edit saves.
pub const SCALE_MIN_AVG: u32 = 2 << 10;

impl ChunkParams {
    /// The parameters a file of `size` bytes is cut with when these are the
    /// cluster's: halved (all three sizes) while the file would have fewer
    /// than [`SCALE_CHUNKS`] average chunks, down to an average of
    /// [`SCALE_MIN_AVG`] or the chunker's bounds: the average is the largest
    /// power of two at most `size / 2`. With the defaults a 100 KiB file
    /// gets 8/32/128 KiB instead of one 64 KiB-average chunk bounded by
    /// 256 KiB, so a file is always cut at content-defined points; files of
    /// 128 KiB and more keep the cluster's sizes.
    ///
    /// Part of the format: every node must cut a file alike, and a manifest
    /// records the parameters it was cut with.
    pub fn for_size(self, size: u64) -> ChunkParams {
        let mut p = self;
        while size < u64::from(p.avg) * SCALE_CHUNKS && p.avg / 2 >= SCALE_MIN_AVG {
            match ChunkParams::new((p.min / 2) & !1, p.avg / 2, (p.max / 2) & !1) {
                Ok(half) => p = half,
                Err(_) => break,
            }
        }
        p
    }
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_scale_down_for_small_files_only() {
        let d = ChunkParams::default();
        let sizes = |size| {
            let p = d.for_size(size);
            (p.min(), p.avg(), p.max())
        };
        assert_eq!(sizes(0), (512, 2048, 8192));
        assert_eq!(sizes(4 << 10), (512, 2048, 8192));
        assert_eq!(sizes(12 << 10), (1024, 4096, 16384));
        assert_eq!(sizes(32 << 10), (4096, 16384, 65536));
        assert_eq!(sizes(100 << 10), (8192, 32768, 131072));
        assert_eq!(sizes((128 << 10) - 1), (8192, 32768, 131072));
        assert_eq!(sizes(128 << 10), (16384, 65536, 262144));
        assert_eq!(sizes(u64::MAX), (16384, 65536, 262144));
        // Monotone: a larger file never gets smaller chunks.
        let mut last = 0;
        for size in (0..(2u64 << 20)).step_by(4099) {
            let avg = d.for_size(size).avg();
            assert!(avg >= last, "avg {avg} at {size} after {last}");
            last = avg;
        }
    }

    #[test]
    fn scaling_stays_within_the_chunker_bounds() {
        // Odd halves round down to even; a half out of bounds stops scaling.
        let p = ChunkParams::new(1030, 4096, 16386).expect("valid");
        let s = p.for_size(0);
        assert_eq!((s.min(), s.avg(), s.max()), (514, 2048, 8192));
        let tiny = ChunkParams::new(64, 4096, 1 << 20).expect("valid");
        assert_eq!(tiny.for_size(0), tiny);
        let small = ChunkParams::new(64, 256, 1024).expect("valid");
        assert_eq!(small.for_size(0), small);
    }

    #[test]
    fn default_is_valid_and_matches_the_design() {
        let p = ChunkParams::default();
        assert_eq!((p.min(), p.avg(), p.max()), (16384, 65536, 262144));
        assert_eq!(ChunkParams::new(16384, 65536, 262144), Ok(p));
    }

    #[test]
    fn rejects_odd_sizes() {
        assert_eq!(
            ChunkParams::new(65, 256, 1024),
            Err(ChunkParamsError::Odd {
                which: "minimum",
                value: 65
            })
        );
        assert!(matches!(
            ChunkParams::new(64, 256, 1025),
            Err(ChunkParamsError::Odd { value: 1025, .. })
        ));
    }

    #[test]
    fn rejects_out_of_bounds() {
        assert!(matches!(
            ChunkParams::new(62, 256, 1024),
            Err(ChunkParamsError::OutOfRange { value: 62, .. })
        ));
        assert!(matches!(
            ChunkParams::new(64, 128, 1024),
            Err(ChunkParamsError::OutOfRange { value: 128, .. })
        ));
        assert!(matches!(
            ChunkParams::new(64, 256, 512),
            Err(ChunkParamsError::OutOfRange { value: 512, .. })
        ));
        assert!(matches!(
            ChunkParams::new(64, 256, (16 << 20) + 2),
            Err(ChunkParamsError::OutOfRange { .. })
        ));
        assert!(matches!(
            ChunkParams::new((1 << 20) + 2, 4 << 20, 16 << 20),
            Err(ChunkParamsError::OutOfRange { .. })
        ));
    }

    #[test]
    fn rejects_bad_order_and_non_power_of_two() {
        assert_eq!(
            ChunkParams::new(256, 256, 1024),
            Err(ChunkParamsError::NotIncreasing {
                min: 256,
                avg: 256,
                max: 1024
            })
        );
        assert!(matches!(
            ChunkParams::new(512, 256, 1024),
            Err(ChunkParamsError::NotIncreasing { .. })
        ));
        assert!(matches!(
            ChunkParams::new(64, 2048, 2048),
            Err(ChunkParamsError::NotIncreasing { .. })
        ));
        assert_eq!(
            ChunkParams::new(64, 384, 1024),
            Err(ChunkParamsError::AvgNotPowerOfTwo { avg: 384 })
        );
    }

    #[test]
    fn error_messages_name_the_value() {
        let e = ChunkParams::new(64, 256, 1025).expect_err("odd max");
        assert_eq!(
            e.to_string(),
            "chunk maximum size 1025 is odd; chunk sizes must be even"
        );
    }
}
