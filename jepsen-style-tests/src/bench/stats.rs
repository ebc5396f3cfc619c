//! Summaries of repeated measurements and latency percentiles.

use std::time::Duration;

/// Median and range of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// `None` for no samples; the median of an even count is the mean of the
/// two middle samples.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: s[0],
        max: s[n - 1],
    })
}

/// The `q`-quantile (0..=1) of `sorted` latencies, nearest rank.
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        assert_eq!(summarize(&[]), None);
        let s = summarize(&[3.0, 1.0, 2.0]).expect("some");
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).expect("some");
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        let s = summarize(&[5.0]).expect("some");
        assert_eq!((s.median, s.min, s.max), (5.0, 5.0, 5.0));
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let l: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&l, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&l, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&l, 1.0), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&l[..1], 0.99), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
