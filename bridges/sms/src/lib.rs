//! The Trestle SMS bridge: SMS conversations through a gateway (Kannel, Twilio-style REST) as
//! Matrix rooms.
#![warn(missing_docs)]

pub mod bridge;
pub mod config;
pub mod encoding;
pub mod gateway;
pub mod number;
pub mod optout;
pub mod ratelimit;
