//! Trestle.

pub mod client;
