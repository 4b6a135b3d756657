//! A real Synapse on a free loopback port, in a temp dir.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_yaml::Value as Yaml;

use crate::{ChildGuard, e2e_home, free_port, wait_for};

/// A running Synapse.
#[derive(Debug)]
pub struct Synapse {
    child: Option<ChildGuard>,
    dir: PathBuf,
    port: u16,
    _tmp: Option<tempfile::TempDir>,
}

/// The Synapse virtualenv's python.
fn python() -> anyhow::Result<PathBuf> {
    let p = e2e_home().join("venv/bin/python");
    if p.exists() {
        Ok(p)
    } else {
        bail!("Synapse is not installed at {}; run scripts/install-deps.sh", p.display())
    }
}

impl Synapse {
    /// Generates a config with the given appservice registration files and starts Synapse.
    pub async fn start(registrations: &[&Path]) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new().prefix("trestle-synapse-").tempdir()?;
        let dir = tmp.path().to_owned();
        let port = free_port();
        let py = python()?;
        let out = Command::new(&py)
            .args(["-m", "synapse.app.homeserver", "--server-name", "localhost", "--config-path"])
            .arg(dir.join("hs.yaml"))
            .args(["--generate-config", "--report-stats=no", "--data-directory"])
            .arg(&dir)
            .current_dir(&dir)
            .output()
            .context("cannot run Synapse's config generator")?;
        if !out.status.success() {
            bail!("synapse --generate-config failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let path = dir.join("hs.yaml");
        let mut hs: Yaml = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
        let map = hs.as_mapping_mut().context("hs.yaml is not a mapping")?;
        let set = |m: &mut serde_yaml::Mapping, k: &str, v: Yaml| {
            m.insert(Yaml::from(k), v);
        };
        let y = |s: &str| -> Yaml { serde_yaml::from_str(s).unwrap_or(Yaml::Null) };
        set(
            map,
            "listeners",
            y(&format!(
                "[{{port: {port}, tls: false, type: http, x_forwarded: false, bind_addresses: ['127.0.0.1'], resources: [{{names: [client], compress: false}}]}}]"
            )),
        );
        set(map, "enable_registration", Yaml::Bool(true));
        set(map, "enable_registration_without_verification", Yaml::Bool(true));
        set(map, "suppress_key_server_warning", Yaml::Bool(true));
        set(map, "trusted_key_servers", y("[]"));
        set(map, "report_stats", Yaml::Bool(false));
        let big = "{per_second: 10000, burst_count: 10000}";
        for k in ["rc_message", "rc_registration", "rc_admin_redaction", "rc_3pid_validation"] {
            set(map, k, y(big));
        }
        set(
            map,
            "rc_login",
            y(&format!("{{address: {big}, account: {big}, failed_attempts: {big}}}")),
        );
        set(map, "rc_joins", y(&format!("{{local: {big}, remote: {big}}}")));
        set(
            map,
            "rc_invites",
            y(&format!("{{per_room: {big}, per_user: {big}, per_sender: {big}}}")),
        );
        let regs: Vec<Yaml> =
            registrations.iter().map(|p| Yaml::from(p.display().to_string())).collect();
        set(map, "app_service_config_files", Yaml::Sequence(regs));
        // Quieter logs: warnings only, into the test dir.
        let log_config = dir.join("localhost.log.config");
        std::fs::write(
            &log_config,
            format!(
                "version: 1\nformatters:\n  f:\n    format: '%(asctime)s %(levelname)s %(name)s %(message)s'\n\
                 handlers:\n  file:\n    class: logging.FileHandler\n    filename: {}\n    formatter: f\n\
                 root:\n  level: INFO\n  handlers: [file]\ndisable_existing_loggers: false\n",
                dir.join("homeserver.log").display()
            ),
        )?;
        set(map, "log_config", Yaml::from(log_config.display().to_string()));
        std::fs::write(&path, serde_yaml::to_string(&hs)?)?;
        let mut this = Self { child: None, dir, port, _tmp: Some(tmp) };
        // A port taken by another process between the pick and Synapse's bind: another port.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match this.launch().await {
                Ok(()) => return Ok(this),
                Err(e) if attempts >= 3 => return Err(e),
                Err(e) => {
                    eprintln!("Synapse did not start on port {} ({e:#}); another port", this.port);
                    this.port = free_port();
                    let listeners = format!(
                        "[{{port: {}, tls: false, type: http, x_forwarded: false, bind_addresses: ['127.0.0.1'], resources: [{{names: [client], compress: false}}]}}]",
                        this.port
                    );
                    if let Some(m) = hs.as_mapping_mut() {
                        m.insert(Yaml::from("listeners"), y(&listeners));
                    }
                    std::fs::write(&path, serde_yaml::to_string(&hs)?)?;
                }
            }
        }
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(python()?);
        cmd.args(["-m", "synapse.app.homeserver", "-c"])
            .arg(self.dir.join("hs.yaml"))
            .current_dir(&self.dir);
        let mut child = ChildGuard::spawn("synapse", cmd, &self.dir.join("stdout.log"))?;
        let url = format!("{}/_matrix/client/versions", self.url());
        let http = reqwest::Client::new();
        let running = std::sync::Mutex::new(&mut child);
        let ready = wait_for("Synapse to answer /versions", Duration::from_secs(90), || async {
            if !running.lock().is_ok_and(|mut c| c.is_running()) {
                // Exited (a port taken meanwhile, say): no point waiting.
                return Some(Err(()));
            }
            http.get(&url).send().await.ok().filter(|r| r.status().is_success()).map(|_| Ok(()))
        })
        .await
        .and_then(|r| r.map_err(|()| anyhow::anyhow!("Synapse exited while starting")));
        if let Err(e) = ready {
            let log = std::fs::read_to_string(self.dir.join("homeserver.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            child.kill_hard();
            bail!(
                "{e}\n--- stdout:\n{}\n--- homeserver.log:\n{}",
                child.log_tail(30),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        self.child = Some(child);
        Ok(())
    }

    /// The client-server API base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops and starts Synapse again, keeping its data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.terminate(Duration::from_secs(20));
        }
        self.launch().await
    }

    /// The last lines of Synapse's log (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("homeserver.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}
