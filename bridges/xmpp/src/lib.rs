//! The Trestle XMPP bridge: XMPP multi-user chats (XEP-0045) as Matrix rooms, through an
//! external component (XEP-0114).
#![warn(missing_docs)]

pub mod bridge;
pub mod config;
pub mod conn;
pub mod ids;
pub mod stanzas;
pub mod styling;
