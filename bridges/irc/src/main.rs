//! `trestle-irc`: the IRC bridge binary.

fn main() -> std::process::ExitCode {
    trestle::run::<trestle_irc::bridge::IrcBridge>()
}
