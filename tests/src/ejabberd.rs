//! A real ejabberd (Debian's) on free ports in a temp dir, configured as `docs/bridges/xmpp.md`
//! tells admins to: an `ejabberd_service` listener for the bridge's external component, a MUC
//! service with MAM, and test users. The same component, MUC and secret names as the Prosody
//! harness, so the same bridge config and [`XmppClient`](crate::prosody::XmppClient) serve both.
//!
//! Debian's `ejabberdctl` runs the server as the `ejabberd` system user when called by root, so
//! the temp dir is handed to that user; other users cannot run it (the start fails saying so).

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use tokio::net::TcpStream;

use crate::{
    ChildGuard, free_port,
    prosody::{COMPONENT, MUC, SECRET},
};

/// Debian's control script.
const EJABBERDCTL: &str = "/usr/sbin/ejabberdctl";

/// A running ejabberd.
#[derive(Debug)]
pub struct Ejabberd {
    child: Option<ChildGuard>,
    node: String,
    c2s_port: u16,
    component_port: u16,
    dir: tempfile::TempDir,
}

impl Ejabberd {
    /// Whether ejabberd is installed (`scripts/install-deps.sh` installs it).
    pub fn installed() -> bool {
        std::path::Path::new(EJABBERDCTL).exists()
    }

    /// Writes the config, starts the server and registers `users` (`(name, password)` on
    /// `localhost`).
    pub async fn start(users: &[(&str, &str)]) -> anyhow::Result<Self> {
        if !Self::installed() {
            bail!("ejabberd is not installed (scripts/install-deps.sh installs it)");
        }
        let dir = tempfile::Builder::new().prefix("trestle-ejabberd-").tempdir()?;
        let (c2s_port, component_port) = (free_port(), free_port());
        // One Erlang node per server: tests run side by side.
        let node = format!("trestle{c2s_port}@localhost");
        for sub in ["spool", "logs"] {
            std::fs::create_dir_all(dir.path().join(sub))?;
        }
        let config = format!(
            r#"hosts:
  - localhost
loglevel: info
listen:
  -
    port: {c2s_port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
  -
    port: {component_port}
    ip: "127.0.0.1"
    module: ejabberd_service
    hosts:
      {COMPONENT}:
        password: "{SECRET}"
auth_method: internal
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  muc_create:
    allow: local
modules:
  mod_disco: {{}}
  mod_ping: {{}}
  mod_roster: {{}}
  mod_vcard: {{}}
  mod_mam:
    default: always
  mod_muc:
    host: {MUC}
    access_create: muc_create
    default_room_options:
      mam: true
"#
        );
        std::fs::write(dir.path().join("ejabberd.yml"), config)?;
        std::fs::write(dir.path().join("ejabberdctl.cfg"), "")?;
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "ejabberd"])
                .arg(dir.path())
                .status()
                .context("cannot run chown")?;
            if !status.success() {
                bail!("cannot hand {} to the ejabberd user", dir.path().display());
            }
        }
        let mut this = Self { child: None, node, c2s_port, component_port, dir };
        this.launch().await?;
        for (user, pass) in users {
            let out = this.ctl().args(["register", user, "localhost", pass]).output()?;
            if !out.status.success() {
                bail!(
                    "ejabberdctl register {user} failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(this)
    }

    /// `ejabberdctl` aimed at this server.
    fn ctl(&self) -> Command {
        let mut cmd = Command::new(EJABBERDCTL);
        cmd.arg("--config")
            .arg(self.path("ejabberd.yml"))
            .arg("--ctl-config")
            .arg(self.path("ejabberdctl.cfg"))
            .arg("--spool")
            .arg(self.path("spool"))
            .arg("--logs")
            .arg(self.path("logs"))
            .arg("--node")
            .arg(&self.node);
        cmd
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let mut cmd = self.ctl();
        cmd.arg("foreground");
        let child = ChildGuard::spawn("ejabberd", cmd, &self.path("ejabberd.out"))?;
        // The Erlang VM takes a few seconds to start.
        for _ in 0..300 {
            if TcpStream::connect(("127.0.0.1", self.component_port)).await.is_ok()
                && TcpStream::connect(("127.0.0.1", self.c2s_port)).await.is_ok()
            {
                self.child = Some(child);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("ejabberd did not start: {}\n{}", child.log_tail(30), self.log_tail(30))
    }

    /// The client port.
    pub fn c2s_port(&self) -> u16 {
        self.c2s_port
    }

    /// The component port.
    pub fn component_port(&self) -> u16 {
        self.component_port
    }

    /// The last lines of the server's log (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        let text =
            std::fs::read_to_string(self.path("logs").join("ejabberd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Ejabberd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill_hard();
        }
        // The VM runs under `su`, which may not share the process group: end it by its node
        // name too.
        let _ =
            Command::new("pkill").args(["-KILL", "-f", &format!("sname {}", self.node)]).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
