//! The Trestle SMS bridge: SMS and MMS conversations through a gateway (Kannel, Twilio-style
//! REST, SMPP) as Matrix rooms.
#![warn(missing_docs)]

pub mod bridge;
pub mod config;
pub mod encoding;
pub mod gateway;
pub mod mms;
pub mod number;
pub mod optout;
pub mod ratelimit;
