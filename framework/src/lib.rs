//! Trestle: a framework for Matrix application-service bridges.
#![warn(missing_docs)]

pub mod appservice;
pub mod client;
pub mod config;
pub mod inbound;
pub mod media;
pub mod metrics;
pub mod registration;
pub mod store;
