//! The Trestle IRC bridge: IRC networks as Matrix rooms.
#![warn(missing_docs)]

pub mod addr;
pub mod bridge;
pub mod certfp;
pub mod config;
pub mod conn;
pub mod format;
pub mod nick;
