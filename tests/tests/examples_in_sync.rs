//! The files under `config/` and `registration/` are what the binaries generate: this test fails
//! when they drift (regenerate with `scripts/regenerate-examples.sh`).

use std::process::Command;

use trestle_e2e::{binary, repo_root};

/// Every binary that has example files, by the name used in the file names.
const BINARIES: &[(&str, &str)] = &[
    ("examples/echo", "echo"),
    ("trestle-irc", "irc"),
    ("trestle-xmpp", "xmpp"),
    ("trestle-sms", "sms"),
];

#[test]
fn example_configs_match_generated_output() -> anyhow::Result<()> {
    for (bin, name) in BINARIES {
        let exe = binary(bin)?;
        let out = Command::new(&exe).arg("example-config").output()?;
        assert!(out.status.success(), "{bin} example-config failed");
        let generated = String::from_utf8(out.stdout)?;
        let path = repo_root().join(format!("config/{name}.example.yaml"));
        let committed = std::fs::read_to_string(&path)?;
        assert!(
            generated == committed,
            "{} differs from `{bin} example-config`; run scripts/regenerate-examples.sh",
            path.display()
        );
        // And the example is a valid config.
        let st = Command::new(&exe).args(["check-config", "-c"]).arg(&path).output()?;
        assert!(st.status.success(), "{name}: {}", String::from_utf8_lossy(&st.stderr));
    }
    Ok(())
}

#[test]
fn example_registrations_match_generated_output() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for (bin, name) in BINARIES {
        let exe = binary(bin)?;
        let config = repo_root().join(format!("config/{name}.example.yaml"));
        let out = dir.path().join(format!("{name}.yaml"));
        let st = Command::new(&exe)
            .args(["generate-registration", "-c"])
            .arg(&config)
            .arg("-o")
            .arg(&out)
            .output()?;
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        let generated: String = std::fs::read_to_string(&out)?
            .lines()
            .map(|l| match l.split_once(": ") {
                Some((k @ ("as_token" | "hs_token"), _)) => {
                    format!("{k}: CHANGE_ME_generated_by_generate-registration")
                }
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let committed =
            std::fs::read_to_string(repo_root().join(format!("registration/{name}.example.yaml")))?;
        assert_eq!(
            generated.trim_end(),
            committed.trim_end(),
            "registration/{name}.example.yaml drifted"
        );
        // Refuses to overwrite without --force.
        let again = Command::new(&exe)
            .args(["generate-registration", "-c"])
            .arg(&config)
            .arg("-o")
            .arg(&out)
            .output()?;
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    }
    Ok(())
}

#[test]
fn check_config_names_the_bad_key() -> anyhow::Result<()> {
    let exe = binary("examples/echo")?;
    let good = std::fs::read_to_string(repo_root().join("config/echo.example.yaml"))?;
    let dir = tempfile::tempdir()?;
    for (from, to, key) in [
        ("listen: 127.0.0.1:9000", "listen: nowhere", "appservice.listen"),
        ("  bot_localpart: echobot", "  bot_localpart: echobot\n  colour: red", "colour"),
        ("reply_prefix: \"echo: \"", "reply_prefix: 5", "bridge.reply_prefix"),
        ("max_attempts: 5", "max_attempts: 0", "queue.max_attempts"),
    ] {
        assert!(good.contains(from), "{from}");
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, good.replacen(from, to, 1))?;
        let out = Command::new(&exe).args(["check-config", "-c"]).arg(&path).output()?;
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "expected {key} in: {err}");
    }
    Ok(())
}
