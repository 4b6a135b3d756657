//! A real Kannel (Debian `kannel` + `kannel-extras`) on free ports: bearerbox with two fake SMSC
//! links, smsbox with a sendsms user and an sms-service calling the bridge, and `fakesmsc` as the
//! "phone network".
//!
//! - Link `fake1`: a long-running `fakesmsc` receives every MT (what the bridge sends); its log
//!   lines `Got message N: <from to type [udh] data>` are parsed by [`Kannel::received`].
//! - Link `fake2`: [`Kannel::inject`] runs a short-lived `fakesmsc -m 1` to send one MO. It has
//!   `allowed-smsc-id = fake2`, so no MT is ever routed to it (the sendsms `smsc` parameter is
//!   only a routing hint: without this, an MT sent while an injector is connected could go
//!   either way).
//! - With the fake SMSC, Kannel reports delivery at once: DLR status 1 (delivered) and 8 (SMSC
//!   ack) reach the `dlr-url` of every MT.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{ChildGuard, free_port, wait_for};

const FAKESMSC: &str = "/usr/lib/kannel/test/fakesmsc";

/// One MT message as fakesmsc printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mt {
    /// Sender.
    pub from: String,
    /// Receiver.
    pub to: String,
    /// `text`, `ucs-2`, or `data` (with a UDH).
    pub kind: String,
    /// The user data header (concatenation: `05 00 03 ref total seq`).
    pub udh: Option<Vec<u8>>,
    /// The payload bytes (URL-decoded for `ucs-2` and `data`).
    pub data: Vec<u8>,
}

impl Mt {
    /// The payload as UCS-2 (UTF-16BE) text.
    pub fn ucs2_text(&self) -> String {
        let units: Vec<u16> = self
            .data
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
            .collect();
        String::from_utf16_lossy(&units)
    }

    /// The payload as 8-bit text (GSM-7 texts arrive as Latin-1/UTF-8 from Kannel's fake SMSC).
    pub fn plain_text(&self) -> String {
        String::from_utf8(self.data.clone())
            .unwrap_or_else(|_| self.data.iter().map(|&b| char::from(b)).collect())
    }

    /// `(total, seq)` from a concatenation UDH.
    pub fn concat(&self) -> Option<(u8, u8)> {
        let u = self.udh.as_ref()?;
        (u.len() >= 6 && u[1] == 0).then(|| (u[4], u[5]))
    }
}

/// fakesmsc prints payloads with Kannel's URL encoding: `+` is a space (a literal `+` is `%2B`).
fn url_decode(s: &str) -> Vec<u8> {
    percent_encoding::percent_decode_str(&s.replace('+', " ")).collect()
}

/// Parses one `Got message` line.
pub fn parse_fakesmsc_line(line: &str) -> Option<Mt> {
    let start = line.find("Got message")?;
    let inner = &line[start..];
    let inner = &inner[inner.find('<')? + 1..inner.rfind('>')?];
    let mut it = inner.splitn(4, ' ');
    let from = it.next()?.to_owned();
    let to = it.next()?.to_owned();
    let kind = it.next()?.to_owned();
    let rest = it.next().unwrap_or("");
    Some(match kind.as_str() {
        "udh" => {
            let (udh, rest) = rest.split_once(' ')?;
            let (kind, data) = rest.split_once(' ')?;
            Mt {
                from,
                to,
                kind: kind.to_owned(),
                udh: Some(url_decode(udh)),
                data: url_decode(data),
            }
        }
        "text" => Mt { from, to, kind, udh: None, data: rest.as_bytes().to_vec() },
        _ => Mt { from, to, kind, udh: None, data: url_decode(rest) },
    })
}

/// A running Kannel with its fake SMSC.
#[derive(Debug)]
pub struct Kannel {
    // Fields drop in order: the processes (which print their logs when a test panics) before
    // the directory holding the logs.
    _bearerbox: ChildGuard,
    _smsbox: ChildGuard,
    _phone: ChildGuard,
    sendsms_port: u16,
    inject_port: u16,
    admin_port: u16,
    dir: tempfile::TempDir,
}

impl Kannel {
    /// Whether Kannel and fakesmsc are installed.
    pub fn available() -> bool {
        Path::new(FAKESMSC).exists() && which("bearerbox").is_some() && which("smsbox").is_some()
    }

    /// Starts bearerbox, the receiving fakesmsc and smsbox. `get_url` is the sms-service URL
    /// (with Kannel escapes) for inbound messages. A start that fails (a port taken by another
    /// process meanwhile) is tried again on other ports.
    pub async fn start(get_url: &str) -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(get_url).await {
                Ok(k) => return Ok(k),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("Kannel did not start")))
    }

    async fn try_start(get_url: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("trestle-kannel-").tempdir()?;
        let (admin, smsbox, fake1, fake2, sendsms) =
            (free_port(), free_port(), free_port(), free_port(), free_port());
        let d = dir.path().display();
        let conf = dir.path().join("kannel.conf");
        std::fs::write(
            &conf,
            format!(
                "group = core\nadmin-port = {admin}\nadmin-password = adm\nsmsbox-port = {smsbox}\n\
                 box-allow-ip = 127.0.0.1\nlog-level = 1\nlog-file = \"{d}/bearerbox.log\"\n\
                 dlr-storage = internal\n\n\
                 group = smsc\nsmsc = fake\nsmsc-id = fake1\nport = {fake1}\nconnect-allow-ip = 127.0.0.1\n\n\
                 group = smsc\nsmsc = fake\nsmsc-id = fake2\nport = {fake2}\nconnect-allow-ip = 127.0.0.1\n\
                 allowed-smsc-id = fake2\n\n\
                 group = smsbox\nbearerbox-host = 127.0.0.1\nsendsms-port = {sendsms}\n\
                 log-file = \"{d}/smsbox.log\"\nlog-level = 1\nmo-recode = true\n\
                 http-request-retry = 3\nhttp-queue-delay = 1\n\n\
                 group = sendsms-user\nusername = bridge\npassword = kannel-pw\nconcatenation = true\n\
                 max-messages = 10\n\n\
                 group = sms-service\nkeyword = default\ncatch-all = true\nmax-messages = 0\n\
                 get-url = \"{get_url}\"\n"
            ),
        )?;
        let mut cmd = Command::new(which("bearerbox").context("bearerbox")?);
        cmd.arg(&conf);
        let mut bearerbox = ChildGuard::spawn("bearerbox", cmd, &dir.path().join("bearerbox.out"))?;
        wait_port(admin, &mut bearerbox).await?;
        let mut cmd = Command::new(FAKESMSC);
        cmd.args(["-H", "127.0.0.1", "-r", &fake1.to_string(), "-i", "1", "-m", "0", "0 0 text x"]);
        let phone = ChildGuard::spawn("fakesmsc", cmd, &dir.path().join("phone.log"))?;
        let mut cmd = Command::new(which("smsbox").context("smsbox")?);
        cmd.arg(&conf);
        let mut smsbox = ChildGuard::spawn("smsbox", cmd, &dir.path().join("smsbox.out"))?;
        wait_port(sendsms, &mut smsbox).await?;
        let this = Self {
            dir,
            _bearerbox: bearerbox,
            _smsbox: smsbox,
            _phone: phone,
            sendsms_port: sendsms,
            inject_port: fake2,
            admin_port: admin,
        };
        // Wait until the receiving link is online.
        let status = format!("http://127.0.0.1:{admin}/status.txt?password=adm");
        wait_for("fake1 online", Duration::from_secs(20), || async {
            let t = reqwest::get(&status).await.ok()?.text().await.ok()?;
            t.lines().any(|l| l.contains("fake1[fake1]") && l.contains("(online")).then_some(())
        })
        .await?;
        Ok(this)
    }

    /// The sendsms URL.
    pub fn sendsms_url(&self) -> String {
        format!("http://127.0.0.1:{}/cgi-bin/sendsms", self.sendsms_port)
    }

    /// The sendsms-user's credentials.
    pub fn credentials(&self) -> (&'static str, &'static str) {
        ("bridge", "kannel-pw")
    }

    /// The admin status page.
    pub async fn status(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(format!("http://127.0.0.1:{}/status.txt?password=adm", self.admin_port))
            .await?
            .text()
            .await?)
    }

    /// Sends one MO from `from` to `to` through the network (GSM text, or UCS-2 when the text
    /// is not ASCII), and waits until fakesmsc has handed it to bearerbox.
    pub async fn inject(&self, from: &str, to: &str, text: &str) -> anyhow::Result<()> {
        let msg = if text.is_ascii() && !text.contains('%') {
            format!("{from} {to} text {text}")
        } else {
            let enc: String = text
                .encode_utf16()
                .flat_map(u16::to_be_bytes)
                .map(|b| format!("%{b:02X}"))
                .collect();
            format!("{from} {to} ucs2 {enc}")
        };
        let n = rand::random::<u32>();
        let log = self.dir.path().join(format!("inject-{n}.log"));
        let mut cmd = Command::new(FAKESMSC);
        cmd.args([
            "-H",
            "127.0.0.1",
            "-r",
            &self.inject_port.to_string(),
            "-i",
            "0.1",
            "-m",
            "1",
            &msg,
        ]);
        let mut child = ChildGuard::spawn("fakesmsc-inject", cmd, &log)?;
        let r = wait_for("fakesmsc to send", Duration::from_secs(20), || async {
            std::fs::read_to_string(&log).ok()?.contains("sent message 1").then_some(())
        })
        .await;
        // Let bearerbox acknowledge before the link drops.
        tokio::time::sleep(Duration::from_millis(500)).await;
        child.kill_hard();
        r
    }

    /// Every MT the phone network received so far.
    pub fn received(&self) -> Vec<Mt> {
        std::fs::read_to_string(self.dir.path().join("phone.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(parse_fakesmsc_line)
            .collect()
    }

    /// Waits until at least `n` MTs were received; returns them all.
    pub async fn wait_received(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<Mt>> {
        let r = wait_for(&format!("{n} MT messages"), timeout, || async {
            let got = self.received();
            (got.len() >= n).then_some(got)
        })
        .await;
        match r {
            Ok(v) => Ok(v),
            Err(e) => bail!("{e}; received: {:?}", self.received()),
        }
    }

    /// The directory with the config and logs.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

fn which(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

async fn wait_port(port: u16, child: &mut ChildGuard) -> anyhow::Result<()> {
    for _ in 0..100 {
        if !child.is_running() {
            break;
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("port {port} did not open: {}", child.log_tail(20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fakesmsc_lines() {
        let m = parse_fakesmsc_line(
            "2026-11-23 12:17:04 [4592] [0] DEBUG: Got message 5: <+441 +447 text hi there {}>",
        )
        .unwrap();
        assert_eq!(
            (m.kind.as_str(), m.plain_text().as_str(), m.udh),
            ("text", "hi there {}", None)
        );
        let m = parse_fakesmsc_line("x DEBUG: Got message 6: <+441 +447 ucs-2 %04O%D8%3D%DEB>")
            .unwrap();
        assert_eq!(m.ucs2_text(), "я🙂");
        let m = parse_fakesmsc_line("x Got message 1: <+441 +447 udh %05%00%03%00%02%01 data xxx>")
            .unwrap();
        assert_eq!(m.concat(), Some((2, 1)));
        assert_eq!(m.plain_text(), "xxx");
        assert!(parse_fakesmsc_line("INFO: fakesmsc starting").is_none());
    }
}
