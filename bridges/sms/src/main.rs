//! `trestle-sms`: the SMS bridge binary.

fn main() -> std::process::ExitCode {
    trestle::run::<trestle_sms::bridge::SmsBridge>()
}
