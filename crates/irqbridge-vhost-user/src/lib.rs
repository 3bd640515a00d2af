//! The irqbridge event-channel device as a vhost-user backend.
