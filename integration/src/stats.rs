// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Latency samples: percentiles, CDFs for plots, and progress reporting of long measurements.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

/// Percentiles of a set of latency samples, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencyStats {
    /// Number of samples.
    pub samples: usize,
    /// Smallest sample.
    pub min_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest sample.
    pub max_us: f64,
}

impl LatencyStats {
    /// The percentiles of `samples` (nearest-rank), or `None` if there are none.
    pub fn from_durations(samples: &[Duration]) -> Option<LatencyStats> {
        let us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        LatencyStats::from_micros(&us)
    }

    /// The percentiles of samples given in microseconds, or `None` if there are none.
    pub fn from_micros(samples: &[f64]) -> Option<LatencyStats> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let pick = |p: f64| {
            // Nearest rank: the smallest sample with at least p of the samples at or below it.
            let rank = (p * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        };
        Some(LatencyStats {
            samples: v.len(),
            min_us: v[0],
            p50_us: pick(0.50),
            p90_us: pick(0.90),
            p99_us: pick(0.99),
            max_us: v[v.len() - 1],
        })
    }
}

/// The fractions at which [`cdf`] samples a distribution (every percent, then 99.5 %, 99.9 %
/// and the maximum), and the CDFs themselves: one implementation with the vhost-user
/// benchmark, so that every report's CDFs have the same points.
pub use irqbridge_vhost_user::bench::{CDF_FRACTIONS, cdf as cdf_of_durations, cdf_us as cdf};

/// Receives the progress of a long measurement (for a progress line on stderr).
pub trait ProgressSink: Send + Sync {
    /// `done` of `total` steps of the phase `label` are complete. A new label starts a new
    /// phase; calls come from any thread.
    fn step(&self, label: &str, done: u64, total: u64);
}

struct Phase {
    sink: Arc<dyn ProgressSink>,
    label: String,
    done: u64,
    total: u64,
}

/// The installed sink and the current phase. Global, because the rows measure on threads of
/// their own and their signatures are shared with other code; see [`set_progress_sink`].
static PROGRESS: Mutex<Option<Phase>> = Mutex::new(None);

/// Installs (or with `None` removes) the sink that [`progress_begin`] and [`progress_advance`]
/// report to. Without a sink they do nothing.
pub fn set_progress_sink(sink: Option<Arc<dyn ProgressSink>>) {
    let mut p = PROGRESS.lock().unwrap_or_else(PoisonError::into_inner);
    *p = sink.map(|sink| Phase {
        sink,
        label: String::new(),
        done: 0,
        total: 0,
    });
}

/// Starts the phase `label` of `total` steps.
pub fn progress_begin(label: &str, total: u64) {
    let mut p = PROGRESS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(phase) = p.as_mut() {
        phase.label = label.to_string();
        phase.done = 0;
        phase.total = total;
        phase.sink.step(label, 0, total);
    }
}

/// `n` more steps of the current phase are done.
pub fn progress_advance(n: u64) {
    let mut p = PROGRESS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(phase) = p.as_mut() {
        phase.done = phase
            .done
            .saturating_add(n)
            .min(phase.total.max(phase.done));
        phase.sink.step(&phase.label, phase.done, phase.total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = LatencyStats::from_micros(&samples).unwrap();
        assert_eq!(s.samples, 100);
        assert_eq!(s.min_us, 1.0);
        assert_eq!(s.p50_us, 50.0);
        assert_eq!(s.p90_us, 90.0);
        assert_eq!(s.p99_us, 99.0);
        assert_eq!(s.max_us, 100.0);
        let one = LatencyStats::from_durations(&[Duration::from_micros(7)]).unwrap();
        assert_eq!((one.p50_us, one.p99_us), (7.0, 7.0));
        assert!(LatencyStats::from_micros(&[]).is_none());
    }

    #[test]
    fn cdf_points() {
        let samples: Vec<f64> = (1..=1000).rev().map(f64::from).collect();
        let c = cdf(&samples);
        assert_eq!(c.len(), CDF_FRACTIONS.len());
        assert_eq!(c[0], [0.0, 1.0]);
        assert_eq!(c[50], [0.5, 500.0]);
        assert_eq!(c[99], [0.99, 990.0]);
        assert_eq!(c[101], [0.999, 999.0]);
        assert_eq!(c[102], [1.0, 1000.0]);
        assert!(
            c.windows(2)
                .all(|w| w[0][0] < w[1][0] && w[0][1] <= w[1][1])
        );
        assert!(cdf(&[]).is_empty());
        assert!(cdf(&[f64::NAN]).is_empty());
        let one = cdf_of_durations(&[Duration::from_micros(3)]);
        assert!(one.iter().all(|p| p[1] == 3.0));
    }

    #[test]
    fn progress_reaches_the_sink() {
        struct Record(Mutex<Vec<(String, u64, u64)>>);
        impl ProgressSink for Record {
            fn step(&self, label: &str, done: u64, total: u64) {
                self.0.lock().unwrap().push((label.into(), done, total));
            }
        }
        progress_begin("no sink", 3);
        progress_advance(1);
        let rec = Arc::new(Record(Mutex::new(Vec::new())));
        set_progress_sink(Some(rec.clone()));
        progress_begin("a", 2);
        progress_advance(1);
        progress_advance(5);
        set_progress_sink(None);
        progress_advance(1);
        let got = rec.0.lock().unwrap().clone();
        assert_eq!(
            got,
            [("a".into(), 0, 2), ("a".into(), 1, 2), ("a".into(), 2, 2)]
        );
    }
}
