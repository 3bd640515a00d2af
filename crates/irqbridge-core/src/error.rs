// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Errors of the interrupt models.

/// Errors returned by the interrupt models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vector number is out of range for this model.
    #[error("vector {0} is out of range")]
    InvalidVector(u32),
    /// A port number is out of range for this model.
    #[error("event channel port {0} is out of range")]
    InvalidPort(u32),
    /// A bad configuration (for example 0 vectors, too many ports, a bad INTx source).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A snapshot does not fit this model (its sizes differ).
    #[error("snapshot does not fit this model: {0}")]
    SnapshotMismatch(String),
    /// Writing a notifier failed.
    #[error("failed to signal an interrupt notifier")]
    Notify(#[source] std::io::Error),
}

/// Result type of the interrupt models.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn messages_and_source() {
        assert_eq!(
            Error::InvalidVector(7).to_string(),
            "vector 7 is out of range"
        );
        assert_eq!(
            Error::InvalidPort(4096).to_string(),
            "event channel port 4096 is out of range"
        );
        let e = Error::Notify(std::io::Error::other("counter overflow"));
        assert_eq!(
            e.source().map(|s| s.to_string()).as_deref(),
            Some("counter overflow")
        );
        assert!(!e.to_string().contains("counter overflow"));
    }
}
