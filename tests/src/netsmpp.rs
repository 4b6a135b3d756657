//! A second SMSC for the end-to-end tests, on a third-party SMPP implementation: Net::SMPP
//! (CPAN; Debian's `libnet-smpp-perl`) driven by `tests/peers/net-smpp-smsc.pl`. Where
//! [`crate::smsc`] checks the bridge's SMPP client byte by byte, this one checks that it
//! interoperates with a codec it shares nothing with.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use crate::{ChildGuard, free_port, repo_root, smsc::Submit, wait_for};

/// The Net::SMPP SMSC, stopped on drop.
#[derive(Debug)]
pub struct NetSmppSmsc {
    child: ChildGuard,
    port: u16,
    control: u16,
    _dir: tempfile::TempDir,
}

impl NetSmppSmsc {
    /// Whether Perl and Net::SMPP are installed.
    pub fn available() -> bool {
        Path::new("/usr/share/perl5/Net/SMPP.pm").exists()
    }

    /// Starts the SMSC on free ports; ESMEs bind with `password`.
    pub async fn start(password: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("trestle-netsmpp-").tempdir()?;
        let (port, control) = (free_port(), free_port());
        let mut cmd = Command::new("perl");
        cmd.arg(repo_root().join("tests/peers/net-smpp-smsc.pl")).args([
            port.to_string(),
            control.to_string(),
            password.to_owned(),
        ]);
        let mut child = ChildGuard::spawn("net-smpp-smsc", cmd, &dir.path().join("smsc.log"))?;
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", control)).await.is_ok() {
                return Ok(Self { child, port, control, _dir: dir });
            }
            if !child.is_running() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the Net::SMPP SMSC did not start: {}", child.log_tail(20))
    }

    /// `host:port` of the SMPP listener.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The SMSC's log (what it received), for failure messages.
    pub fn log(&self) -> String {
        self.child.log_tail(40)
    }

    /// Sends a control command; returns the answer's lines.
    async fn command(&self, line: &str) -> anyhow::Result<Vec<String>> {
        let mut conn = TcpStream::connect(("127.0.0.1", self.control)).await?;
        conn.write_all(format!("{line}\n").as_bytes()).await?;
        let mut lines = BufReader::new(conn).lines();
        let mut out = Vec::new();
        while let Some(l) = lines.next_line().await? {
            if l == "END" {
                return Ok(out);
            }
            if l.starts_with("error") {
                bail!("{line}: {l}");
            }
            out.push(l);
        }
        bail!("{line}: the SMSC closed the control connection")
    }

    /// Waits until an ESME is bound.
    pub async fn wait_bound(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_for("an ESME bound to Net::SMPP", timeout, || async {
            let status = self.command("status").await.ok()?;
            status.iter().any(|l| l == "bound 1").then_some(())
        })
        .await
    }

    /// Sends an MO `deliver_sm` (GSM default alphabet); returns its sequence number.
    pub async fn mo(&self, from: &str, to: &str, text: &str) -> anyhow::Result<u32> {
        let hex: String = text.bytes().map(|b| format!("{b:02x}")).collect();
        self.sent(&self.command(&format!("mo {from} {to} {hex}")).await?)
    }

    /// Sends an MO `deliver_sm` with the text in the `message_payload` TLV (short_message empty),
    /// as SMSCs do for long messages without concatenation.
    pub async fn mo_payload(&self, from: &str, to: &str, text: &str) -> anyhow::Result<u32> {
        let hex: String = text.bytes().map(|b| format!("{b:02x}")).collect();
        self.sent(&self.command(&format!("mo_payload {from} {to} {hex}")).await?)
    }

    /// Sends a delivery receipt for `message_id` with `stat` (`DELIVRD`, `UNDELIV`, …).
    pub async fn receipt(
        &self,
        from: &str,
        to: &str,
        message_id: &str,
        stat: &str,
    ) -> anyhow::Result<u32> {
        self.sent(&self.command(&format!("receipt {from} {to} {message_id} {stat}")).await?)
    }

    fn sent(&self, answer: &[String]) -> anyhow::Result<u32> {
        answer
            .first()
            .and_then(|l| l.strip_prefix("ok "))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("unexpected answer {answer:?}"))
    }

    /// The status the ESME gave in its `deliver_sm_resp` to `seq`, once it answered.
    pub async fn wait_resp(&self, seq: u32, timeout: Duration) -> anyhow::Result<u32> {
        wait_for(&format!("deliver_sm_resp {seq}"), timeout, || async {
            let status = self.command("status").await.ok()?;
            status.iter().find_map(|l| {
                let mut w = l.strip_prefix("resp ")?.split(' ');
                (w.next()?.parse::<u32>().ok()? == seq).then(|| w.next()?.parse().ok())?
            })
        })
        .await
    }

    /// Answers the next `n` `submit_sm` with `ESME_RTHROTTLED`.
    pub async fn throttle_next(&self, n: u32) -> anyhow::Result<()> {
        self.command(&format!("throttle {n}")).await.map(drop)
    }

    /// How many `submit_sm` were throttled.
    pub async fn throttled(&self) -> anyhow::Result<u32> {
        let status = self.command("status").await?;
        status
            .iter()
            .find_map(|l| l.strip_prefix("throttled ")?.parse().ok())
            .context("no throttled count")
    }

    /// Every `submit_sm` accepted so far.
    pub async fn submits(&self) -> anyhow::Result<Vec<PeerSubmit>> {
        self.command("submits").await?.iter().map(|l| parse_submit(l)).collect()
    }

    /// Waits until at least `n` `submit_sm` were accepted; returns them all.
    pub async fn wait_submits(
        &self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<PeerSubmit>> {
        wait_for(&format!("{n} submit_sm at Net::SMPP"), timeout, || async {
            self.submits().await.ok().filter(|s| s.len() >= n)
        })
        .await
    }
}

/// A `submit_sm` at Net::SMPP: what [`Submit`] holds (`short_message` is the user data, from
/// the `message_payload` TLV when `payload`).
#[derive(Debug, Clone)]
pub struct PeerSubmit {
    /// The submit.
    pub submit: Submit,
    /// Whether the text came in `message_payload`.
    pub payload: bool,
}

/// `submit MSGID SRC_TON SRC DST_TON DST DCS ESM REG HEXTEXT` (HEXTEXT `p:…` for a payload).
fn parse_submit(line: &str) -> anyhow::Result<PeerSubmit> {
    let w: Vec<&str> = line.split(' ').collect();
    let [_, id, src_ton, src, dst_ton, dst, dcs, esm, reg, rest @ ..] = w.as_slice() else {
        bail!("malformed submit line {line:?}");
    };
    let hex = rest.first().copied().unwrap_or_default();
    let (hex, payload) = match hex.strip_prefix("p:") {
        Some(h) => (h, true),
        None => (hex, false),
    };
    let short_message = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .with_context(|| format!("bad hex in {line:?}"))?;
    let submit = Submit {
        source: (src_ton.parse()?, (*src).to_owned()),
        dest: (dst_ton.parse()?, (*dst).to_owned()),
        esm_class: esm.parse()?,
        registered_delivery: reg.parse()?,
        data_coding: dcs.parse()?,
        short_message,
        message_id: (*id).to_owned(),
    };
    Ok(PeerSubmit { submit, payload })
}
