// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Log output of the daemon: one line per record on stderr, without a module path.
//!
//! Every message starts with the component it comes from (`vfio-user:`, `control:`,
//! `vhost-user: conn 0:`, …), so the line carries no second prefix:
//!
//! ```text
//! 2026-12-02T17:31:23.123Z INFO  vfio-user: listening on /run/irqbridge/vu.sock
//! ```
//!
//! When stderr is the systemd journal (`JOURNAL_STREAM` names the stderr socket) the time stamp
//! is left to the journal and the level becomes a `sd-daemon(3)` priority prefix (`<3>` error,
//! `<4>` warning, `<6>` info, `<7>` debug and trace), so `journalctl -p` filters by it.
//!
//! Level precedence: `--log-level` if given, else `RUST_LOG` (full `env_logger` filter syntax,
//! e.g. `irqbridge_vfio_user=debug`), else the subcommand's default.

use std::io::Write;

use log::{Level, LevelFilter};

/// The `sd-daemon(3)` priority prefix of a level.
pub fn journal_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Whether stderr is the journal stream systemd announced in `JOURNAL_STREAM` (`DEV:INODE`).
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", meta.dev(), meta.ino())
}

/// The filter to use: `cli` (`--log-level`) over `rust_log` (`RUST_LOG`) over `default`.
pub fn filter_spec(
    cli: Option<LevelFilter>,
    rust_log: Option<&str>,
    default: LevelFilter,
) -> String {
    match (cli, rust_log.filter(|s| !s.trim().is_empty())) {
        (Some(level), _) => level.as_str().to_ascii_lowercase(),
        (None, Some(spec)) => spec.to_string(),
        (None, None) => default.as_str().to_ascii_lowercase(),
    }
}

/// Installs the logger (see the module docs). A second call does nothing.
pub fn init(cli: Option<LevelFilter>, default: LevelFilter) {
    let spec = filter_spec(cli, std::env::var("RUST_LOG").ok().as_deref(), default);
    let journal = stderr_is_journal();
    let mut builder = env_logger::Builder::new();
    builder
        .parse_filters(&spec)
        .target(env_logger::Target::Stderr)
        .format(move |buf, record| {
            if journal {
                writeln!(
                    buf,
                    "<{}>{}",
                    journal_priority(record.level()),
                    record.args()
                )
            } else {
                let ts = buf.timestamp_millis();
                writeln!(buf, "{ts} {:<5} {}", record.level(), record.args())
            }
        });
    // Fails only if a logger is already installed (a second call); keep that one.
    let _ = builder.try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence() {
        let d = LevelFilter::Info;
        assert_eq!(filter_spec(None, None, d), "info");
        assert_eq!(filter_spec(None, Some("debug"), d), "debug");
        assert_eq!(filter_spec(None, Some("  "), d), "info");
        assert_eq!(
            filter_spec(None, Some("irqbridge_vfio_user=trace"), d),
            "irqbridge_vfio_user=trace"
        );
        assert_eq!(
            filter_spec(Some(LevelFilter::Warn), Some("debug"), d),
            "warn"
        );
        assert_eq!(filter_spec(Some(LevelFilter::Off), None, d), "off");
    }

    #[test]
    fn priorities() {
        assert_eq!(journal_priority(Level::Error), 3);
        assert_eq!(journal_priority(Level::Warn), 4);
        assert_eq!(journal_priority(Level::Info), 6);
        assert_eq!(journal_priority(Level::Trace), 7);
    }
}
