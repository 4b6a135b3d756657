//! `trestle-xmpp`: the XMPP bridge binary.

fn main() -> std::process::ExitCode {
    trestle::run::<trestle_xmpp::bridge::XmppBridge>()
}
