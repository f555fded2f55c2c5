//! Shared helpers for the cross-process integration tests.
