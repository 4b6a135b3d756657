//! Helpers every bridge needs.

pub mod bridge_info;
pub mod reply;
