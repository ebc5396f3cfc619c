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

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
