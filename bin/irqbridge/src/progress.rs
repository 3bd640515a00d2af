// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A progress line on stderr for `irqbridge bench`.
//!
//! On a terminal the line is redrawn in place at most ten times a second and cleared at the
//! end. Otherwise (a CI log, a pipe) a line is printed when a phase starts, every ten seconds
//! while it runs and when it completes, so the log shows what ran and for how long.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often a terminal line is redrawn at most.
const TTY_INTERVAL: Duration = Duration::from_millis(100);
/// How often a log line is printed at most while a phase runs.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct State {
    label: String,
    phase_start: Instant,
    last_output: Option<Instant>,
    drawn: bool,
    completed: bool,
}

/// Renders benchmark progress to stderr (see the module docs).
#[derive(Debug)]
pub struct StderrProgress {
    prefix: String,
    tty: bool,
    state: Mutex<State>,
}

/// One progress line: `bench [1/4] msix: 530/1100 (48%), 3.2 s`.
pub fn render(prefix: &str, label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let percent = done.saturating_mul(100).checked_div(total).unwrap_or(100);
    format!(
        "{prefix} {label}: {done}/{total} ({percent}%), {:.1} s",
        elapsed.as_secs_f64()
    )
}

impl StderrProgress {
    /// A progress line whose messages start with `prefix`; redrawn in place if stderr is a
    /// terminal.
    pub fn new(prefix: &str) -> StderrProgress {
        StderrProgress::with_tty(prefix, std::io::stderr().is_terminal())
    }

    /// As [`StderrProgress::new`], with the terminal decision made by the caller.
    pub fn with_tty(prefix: &str, tty: bool) -> StderrProgress {
        StderrProgress {
            prefix: prefix.to_string(),
            tty,
            state: Mutex::new(State {
                label: String::new(),
                phase_start: Instant::now(),
                last_output: None,
                drawn: false,
                completed: false,
            }),
        }
    }

    /// What to print for this step, if anything, and updates the state.
    fn output(&self, label: &str, done: u64, total: u64, now: Instant) -> Option<String> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let new_phase = s.label != label;
        if new_phase {
            s.label = label.to_string();
            s.phase_start = now;
            s.last_output = None;
            s.completed = false;
        }
        let complete = done >= total;
        let line = render(&self.prefix, label, done, total, now - s.phase_start);
        let since = s.last_output.map(|t| now - t);
        if self.tty {
            if new_phase || complete || since.is_none_or(|d| d >= TTY_INTERVAL) {
                s.last_output = Some(now);
                s.drawn = true;
                return Some(format!("\r\x1b[K{line}"));
            }
            return None;
        }
        if complete {
            if s.completed {
                return None;
            }
            s.completed = true;
            s.last_output = Some(now);
            return Some(format!("{line}, done\n"));
        }
        if new_phase || since.is_none_or(|d| d >= LOG_INTERVAL) {
            s.last_output = Some(now);
            return Some(format!("{line}\n"));
        }
        None
    }

    /// Reports a step of phase `label`.
    pub fn step(&self, label: &str, done: u64, total: u64) {
        if let Some(text) = self.output(label, done, total, Instant::now()) {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(text.as_bytes());
            let _ = err.flush();
        }
    }

    /// Clears the terminal line (nothing to do for a log).
    pub fn finish(&self) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if self.tty && s.drawn {
            s.drawn = false;
            let _ = std::io::stderr().write_all(b"\r\x1b[K");
        }
    }
}

impl irqbridge_integration::stats::ProgressSink for StderrProgress {
    fn step(&self, label: &str, done: u64, total: u64) {
        StderrProgress::step(self, label, done, total);
    }
}

impl irqbridge_vhost_user::bench::BenchProgress for StderrProgress {
    fn step(&self, label: &str, done: u64, total: u64) {
        StderrProgress::step(self, label, done, total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_format() {
        assert_eq!(
            render(
                "bench",
                "[1/4] msix",
                530,
                1100,
                Duration::from_millis(3200)
            ),
            "bench [1/4] msix: 530/1100 (48%), 3.2 s"
        );
        assert_eq!(
            render("b", "x", 0, 0, Duration::ZERO),
            "b x: 0/0 (100%), 0.0 s"
        );
    }

    #[test]
    fn log_mode_prints_start_periodic_and_done_once() {
        let p = StderrProgress::with_tty("bench", false);
        let t0 = Instant::now();
        let start = p.output("a", 0, 10, t0).unwrap();
        assert!(
            start.starts_with("bench a: 0/10") && start.ends_with('\n'),
            "{start}"
        );
        assert!(p.output("a", 1, 10, t0 + Duration::from_secs(1)).is_none());
        let periodic = p.output("a", 5, 10, t0 + Duration::from_secs(11)).unwrap();
        assert!(periodic.contains("5/10 (50%), 11.0 s"), "{periodic}");
        let done = p.output("a", 10, 10, t0 + Duration::from_secs(12)).unwrap();
        assert!(done.ends_with(", done\n"), "{done}");
        assert!(
            p.output("a", 10, 10, t0 + Duration::from_secs(13))
                .is_none()
        );
        assert!(p.output("b", 0, 3, t0 + Duration::from_secs(13)).is_some());
    }

    #[test]
    fn tty_mode_redraws_in_place_and_throttles() {
        let p = StderrProgress::with_tty("bench", true);
        let t0 = Instant::now();
        let first = p.output("a", 0, 100, t0).unwrap();
        assert!(
            first.starts_with("\r\x1b[K") && !first.contains('\n'),
            "{first:?}"
        );
        assert!(
            p.output("a", 1, 100, t0 + Duration::from_millis(10))
                .is_none()
        );
        assert!(
            p.output("a", 2, 100, t0 + Duration::from_millis(150))
                .is_some()
        );
        assert!(
            p.output("a", 100, 100, t0 + Duration::from_millis(160))
                .is_some()
        );
    }
}
