// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Errors and the machine-parseable result lines.
//!
//! One line per result: `IRQBRIDGE-RESULT name=<name> status=PASS|FAIL key=value ...`, values
//! without spaces; a failure adds `error="<sentence>"` last. The run ends with
//! `IRQBRIDGE-DONE pass=N fail=M`.

use std::fmt::{self, Display};
use std::io;

/// Why a scenario failed: a sentence for the result line.
#[derive(Debug)]
pub struct Error(String);

impl Error {
    /// An error with the given message.
    pub fn msg(m: impl Into<String>) -> Self {
        Self(m.into())
    }
}

impl Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Self(e.to_string())
    }
}

/// Result of a scenario step.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds what was being done to an I/O error.
pub trait Context<T> {
    /// Prefixes the error with `what` ("opening /dev/vfio/vfio: No such file or directory").
    fn ctx(self, what: impl Display) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, what: impl Display) -> Result<T> {
        self.map_err(|e| Error(format!("{what}: {e}")))
    }
}

/// Fails with a formatted message.
#[macro_export]
macro_rules! bail {
    ($($t:tt)*) => { return Err($crate::report::Error::msg(format!($($t)*))) };
}

/// The key=value facts one result line reports.
#[derive(Debug, Default)]
pub struct Facts(Vec<(String, String)>);

impl Facts {
    /// Records (or replaces) `key=value`.
    pub fn set(&mut self, key: &str, value: impl Display) {
        let v = value.to_string().replace(char::is_whitespace, "_");
        if let Some(slot) = self.0.iter_mut().find(|(k, _)| k == key) {
            slot.1 = v;
        } else {
            self.0.push((key.to_string(), v));
        }
    }

    /// Records `key=got` and fails unless `got == want`.
    pub fn expect_eq<T: PartialEq + Display>(&mut self, key: &str, got: T, want: T) -> Result<()> {
        self.set(key, &got);
        if got == want {
            Ok(())
        } else {
            Err(Error(format!("{key} is {got}, expected {want}")))
        }
    }

    /// Records `key=got` (hex) and fails unless `got == want`.
    pub fn expect_hex(&mut self, key: &str, got: u64, want: u64) -> Result<()> {
        self.set(key, format_args!("{got:#x}"));
        if got == want {
            Ok(())
        } else {
            Err(Error(format!("{key} is {got:#x}, expected {want:#x}")))
        }
    }
}

/// The `IRQBRIDGE-RESULT` line for one result.
pub fn result_line(name: &str, facts: &Facts, outcome: &Result<()>) -> String {
    let mut line = format!("IRQBRIDGE-RESULT name={name} status=");
    line.push_str(if outcome.is_ok() { "PASS" } else { "FAIL" });
    for (k, v) in &facts.0 {
        line.push_str(&format!(" {k}={v}"));
    }
    if let Err(e) = outcome {
        line.push_str(&format!(
            " error=\"{}\"",
            e.0.replace('"', "'").replace('\n', " ")
        ));
    }
    line
}

/// Counts results and prints their lines.
#[derive(Debug, Default)]
pub struct Reporter {
    pass: u32,
    fail: u32,
}

impl Reporter {
    /// Prints the result line for `name` and counts it.
    pub fn record(&mut self, name: &str, facts: &Facts, outcome: &Result<()>) {
        if outcome.is_ok() {
            self.pass += 1;
        } else {
            self.fail += 1;
        }
        println!("{}", result_line(name, facts, outcome));
    }

    /// Runs `f` with fresh facts and records its outcome under `name`; returns whether it passed.
    pub fn run(&mut self, name: &str, f: impl FnOnce(&mut Facts) -> Result<()>) -> bool {
        let mut facts = Facts::default();
        let outcome = f(&mut facts);
        self.record(name, &facts, &outcome);
        outcome.is_ok()
    }

    /// Number of failed results so far.
    pub fn failed(&self) -> u32 {
        self.fail
    }

    /// Prints the closing `IRQBRIDGE-DONE` line.
    pub fn done(&self) {
        println!("IRQBRIDGE-DONE pass={} fail={}", self.pass, self.fail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_single_tokens_per_fact_and_quote_the_error() {
        let mut f = Facts::default();
        f.set("kernel", "6.1 cloud");
        f.set("n", 1);
        f.set("n", 2);
        assert_eq!(
            result_line("boot", &f, &Ok(())),
            "IRQBRIDGE-RESULT name=boot status=PASS kernel=6.1_cloud n=2"
        );
        let err = f.expect_eq("count", 3u32, 4u32);
        let line = result_line("x", &f, &err);
        assert_eq!(
            line,
            "IRQBRIDGE-RESULT name=x status=FAIL kernel=6.1_cloud n=2 count=3 error=\"count is 3, expected 4\""
        );
        let quoted = result_line("y", &Facts::default(), &Err(Error::msg("a \"b\"\nc")));
        assert!(quoted.ends_with("error=\"a 'b' c\""), "{quoted}");
    }

    #[test]
    fn reporter_counts_pass_and_fail() {
        let mut r = Reporter::default();
        assert!(r.run("a", |_| Ok(())));
        assert!(!r.run("b", |f| f.expect_hex("v", 1, 2)));
        assert_eq!(r.failed(), 1);
        assert_eq!(r.pass, 1);
    }
}
