//! Helpers every bridge needs.

pub mod bridge_info;
pub mod escape;
pub mod format;
pub mod keyed;
pub mod reply;
pub mod split;
pub mod template;
