//! A small SMPP 3.4 SMSC for end-to-end tests, written independently of the bridge's codec (its
//! own byte handling, nothing shared): it accepts `bind_transceiver` (checking the password),
//! answers `enquire_link`, records every `submit_sm` and answers it with a message id, or with
//! `ESME_RTHROTTLED` while told to, and sends `deliver_sm` (MO messages and delivery receipts)
//! to the bound ESME, recording the status of each `deliver_sm_resp`.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

/// A `submit_sm` as received.
#[derive(Debug, Clone)]
pub struct Submit {
    /// source_addr_ton and source_addr.
    pub source: (u8, String),
    /// dest_addr_ton and destination_addr.
    pub dest: (u8, String),
    pub esm_class: u8,
    pub registered_delivery: u8,
    pub data_coding: u8,
    /// The short_message field, UDH included.
    pub short_message: Vec<u8>,
    /// The id the SMSC answered with.
    pub message_id: String,
}

impl Submit {
    /// The concatenation UDH `05 00 03 ref total seq`, if present: (ref, total, seq).
    pub fn concat(&self) -> Option<(u8, u8, u8)> {
        match self.short_message.get(..6) {
            Some([5, 0, 3, r, t, s]) if self.esm_class & 0x40 != 0 => Some((*r, *t, *s)),
            _ => None,
        }
    }

    /// The text bytes after any UDH.
    pub fn payload(&self) -> &[u8] {
        if self.esm_class & 0x40 != 0 {
            let l = usize::from(self.short_message.first().copied().unwrap_or(0));
            self.short_message.get(l + 1..).unwrap_or_default()
        } else {
            &self.short_message
        }
    }

    /// The payload as UCS-2 (data_coding 8).
    pub fn ucs2_text(&self) -> String {
        let u: Vec<u16> =
            self.payload().chunks_exact(2).map(|p| u16::from_be_bytes([p[0], p[1]])).collect();
        String::from_utf16_lossy(&u)
    }
}

#[derive(Debug, Default)]
struct State {
    binds: Vec<(String, String, String)>,
    submits: Vec<Submit>,
    throttle: u32,
    throttled: u32,
    next_id: u32,
    seq: u32,
    /// The bound session's writer.
    session: Option<mpsc::Sender<Vec<u8>>>,
    /// (sequence, command_id, command_status) of every response the ESME sent.
    resps: Vec<(u32, u32, u32)>,
    /// Ends the bound session.
    kick: Option<Arc<tokio::sync::Notify>>,
    enquire_links: u32,
}

/// The fake SMSC.
#[derive(Debug, Clone)]
pub struct Smsc {
    port: u16,
    password: String,
    state: Arc<Mutex<State>>,
}

fn pdu(command: u32, status: u32, seq: u32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(16 + body.len() as u32).to_be_bytes());
    v.extend_from_slice(&command.to_be_bytes());
    v.extend_from_slice(&status.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Splits a NUL-terminated string off the front.
fn cstring(b: &[u8]) -> Option<(String, &[u8])> {
    let n = b.iter().position(|&c| c == 0)?;
    Some((String::from_utf8_lossy(&b[..n]).into_owned(), &b[n + 1..]))
}

fn parse_submit(b: &[u8]) -> Option<Submit> {
    let (_service, b) = cstring(b)?;
    let (s_ton, b) = (*b.first()?, b.get(2..)?);
    let (source, b) = cstring(b)?;
    let (d_ton, b) = (*b.first()?, b.get(2..)?);
    let (dest, b) = cstring(b)?;
    let esm_class = *b.first()?;
    let b = b.get(3..)?; // esm_class, protocol_id, priority_flag
    let (_sched, b) = cstring(b)?;
    let (_validity, b) = cstring(b)?;
    let registered_delivery = *b.first()?;
    let data_coding = *b.get(2)?;
    let len = usize::from(*b.get(4)?);
    let short_message = b.get(5..5 + len)?.to_vec();
    Some(Submit {
        source: (s_ton, source),
        dest: (d_ton, dest),
        esm_class,
        registered_delivery,
        data_coding,
        short_message,
        message_id: String::new(),
    })
}

/// The body of a deliver_sm with these fields (`+` numbers as international).
fn deliver_body(
    from: &str,
    to: &str,
    esm_class: u8,
    data_coding: u8,
    short_message: &[u8],
    tlvs: &[(u16, &[u8])],
) -> anyhow::Result<Vec<u8>> {
    let addr = |n: &str| -> Vec<u8> {
        let (ton, digits) = match n.strip_prefix('+') {
            Some(d) => (1u8, d),
            None => (0u8, n),
        };
        [&[ton, 1][..], digits.as_bytes(), &[0]].concat()
    };
    let mut body = vec![0u8]; // service_type ""
    body.extend(addr(from));
    body.extend(addr(to));
    body.extend_from_slice(&[esm_class, 0, 0, 0, 0, 0, 0, data_coding, 0]);
    body.push(u8::try_from(short_message.len())?);
    body.extend_from_slice(short_message);
    for (tag, v) in tlvs {
        body.extend_from_slice(&tag.to_be_bytes());
        body.extend_from_slice(&u16::try_from(v.len())?.to_be_bytes());
        body.extend_from_slice(v);
    }
    Ok(body)
}

impl Smsc {
    /// Listens on a free local port; accepts binds with `password`.
    pub async fn start(password: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let smsc = Self {
            port: listener.local_addr()?.port(),
            password: password.to_owned(),
            state: Arc::default(),
        };
        let s = smsc.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move { s.serve(conn).await });
            }
        });
        Ok(smsc)
    }

    /// `host:port`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn serve(self, conn: TcpStream) {
        let (mut rd, mut wr) = conn.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    break;
                }
            }
        });
        let kick = Arc::new(tokio::sync::Notify::new());
        loop {
            let mut head = [0u8; 16];
            tokio::select! {
                r = rd.read_exact(&mut head) => if r.is_err() { break },
                () = kick.notified() => break,
            }
            let word =
                |i: usize| u32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
            let (len, command, status, seq) = (word(0) as usize, word(4), word(8), word(12));
            if !(16..=65536).contains(&len) {
                break;
            }
            let mut body = vec![0u8; len - 16];
            if rd.read_exact(&mut body).await.is_err() {
                break;
            }
            let answer = {
                let mut st = self.state.lock().unwrap();
                match command {
                    0x0000_0009 => {
                        let parsed = cstring(&body).and_then(|(id, rest)| {
                            let (pw, rest) = cstring(rest)?;
                            let (ty, _) = cstring(rest)?;
                            Some((id, pw, ty))
                        });
                        match parsed {
                            Some(b) if b.1 == self.password => {
                                st.binds.push(b);
                                st.session = Some(tx.clone());
                                st.kick = Some(Arc::clone(&kick));
                                pdu(0x8000_0009, 0, seq, b"fakesmsc\0")
                            }
                            // ESME_RINVPASWD
                            _ => pdu(0x8000_0009, 0x0E, seq, b""),
                        }
                    }
                    0x0000_0015 => {
                        st.enquire_links += 1;
                        pdu(0x8000_0015, 0, seq, b"")
                    }
                    0x0000_0004 => match parse_submit(&body) {
                        _ if st.throttle > 0 => {
                            st.throttle -= 1;
                            st.throttled += 1;
                            pdu(0x8000_0004, 0x58, seq, b"")
                        }
                        Some(mut s) => {
                            st.next_id += 1;
                            s.message_id = format!("msg{:04}", st.next_id);
                            let body = format!("{}\0", s.message_id);
                            st.submits.push(s);
                            pdu(0x8000_0004, 0, seq, body.as_bytes())
                        }
                        // ESME_RINVMSGLEN
                        None => pdu(0x8000_0004, 0x01, seq, b""),
                    },
                    c if c & 0x8000_0000 != 0 => {
                        st.resps.push((seq, c, status));
                        continue;
                    }
                    0x0000_0006 => {
                        let _ = tx.try_send(pdu(0x8000_0006, 0, seq, b""));
                        break;
                    }
                    // generic_nack, ESME_RINVCMDID
                    _ => pdu(0x8000_0000, 0x03, seq, b""),
                }
            };
            if tx.send(answer).await.is_err() {
                break;
            }
        }
    }

    /// Answers the next `n` submit_sm with ESME_RTHROTTLED.
    pub fn throttle_next(&self, n: u32) {
        self.state.lock().unwrap().throttle = n;
    }

    /// How many submit_sm were throttled.
    pub fn throttled(&self) -> u32 {
        self.state.lock().unwrap().throttled
    }

    /// The binds seen: (system_id, password, system_type).
    pub fn binds(&self) -> Vec<(String, String, String)> {
        self.state.lock().unwrap().binds.clone()
    }

    /// enquire_links answered.
    pub fn enquire_links(&self) -> u32 {
        self.state.lock().unwrap().enquire_links
    }

    /// Accepted submit_sm so far.
    pub fn submits(&self) -> Vec<Submit> {
        self.state.lock().unwrap().submits.clone()
    }

    /// Waits until `n` submit_sm were accepted.
    pub async fn wait_submits(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<Submit>> {
        crate::wait_for(&format!("{n} submit_sm"), timeout, || async {
            let s = self.submits();
            (s.len() >= n).then_some(s)
        })
        .await
    }

    /// Waits for a bound session.
    pub async fn wait_bound(&self, timeout: Duration) -> anyhow::Result<()> {
        crate::wait_for("an SMPP bind", timeout, || async {
            self.state.lock().unwrap().session.is_some().then_some(())
        })
        .await
    }

    /// Drops the bound session's connection (the ESME should reconnect and bind again).
    pub fn kick(&self) {
        let mut st = self.state.lock().unwrap();
        st.session = None;
        if let Some(k) = st.kick.take() {
            k.notify_one();
        }
    }

    /// Sends a request PDU with an empty body; returns the response's (command_id, status).
    pub async fn request(&self, command_id: u32, timeout: Duration) -> anyhow::Result<(u32, u32)> {
        let seq = self.send(command_id, &[]).await?;
        self.response(seq, timeout).await
    }

    async fn send(&self, command_id: u32, body: &[u8]) -> anyhow::Result<u32> {
        let (seq, session) = {
            let mut st = self.state.lock().unwrap();
            st.seq += 1;
            (0x4000_0000 + st.seq, st.session.clone())
        };
        let session = session.ok_or_else(|| anyhow::anyhow!("no ESME bound"))?;
        session.send(pdu(command_id, 0, seq, body)).await?;
        Ok(seq)
    }

    async fn response(&self, seq: u32, timeout: Duration) -> anyhow::Result<(u32, u32)> {
        crate::wait_for("the ESME's response", timeout, || async {
            let st = self.state.lock().unwrap();
            st.resps.iter().find(|(s, _, _)| *s == seq).map(|(_, c, status)| (*c, *status))
        })
        .await
    }

    /// Sends a deliver_sm with these fields and waits for its response's command_status.
    #[allow(clippy::too_many_arguments)]
    pub async fn deliver(
        &self,
        from: &str,
        to: &str,
        esm_class: u8,
        data_coding: u8,
        short_message: &[u8],
        tlvs: &[(u16, &[u8])],
        timeout: Duration,
    ) -> anyhow::Result<u32> {
        let body = deliver_body(from, to, esm_class, data_coding, short_message, tlvs)?;
        let seq = self.send(0x0000_0005, &body).await?;
        let (command, status) = self.response(seq, timeout).await?;
        anyhow::ensure!(command == 0x8000_0005, "answered with command 0x{command:08X}");
        Ok(status)
    }

    /// Sends a GSM-7 deliver_sm and drops the session at once, so that the ESME's answer never
    /// arrives (as when a connection breaks): a real SMSC then delivers it again.
    pub async fn deliver_unanswered(
        &self,
        from: &str,
        to: &str,
        short_message: &[u8],
    ) -> anyhow::Result<()> {
        let body = deliver_body(from, to, 0, 0, short_message, &[])?;
        self.send(0x0000_0005, &body).await?;
        self.kick();
        Ok(())
    }

    /// A delivery receipt for `message_id` (the conventional text and the
    /// `receipted_message_id` / `message_state` TLVs).
    pub async fn receipt(
        &self,
        from: &str,
        to: &str,
        message_id: &str,
        stat: &str,
        timeout: Duration,
    ) -> anyhow::Result<u32> {
        let text = format!(
            "id:{message_id} sub:001 dlvrd:001 submit date:2611231200 done date:2611231201 stat:{stat} err:000 text:"
        );
        let state: u8 = if stat == "DELIVRD" { 2 } else { 5 };
        let id = format!("{message_id}\0");
        self.deliver(
            from,
            to,
            0x04,
            0,
            text.as_bytes(),
            &[(0x001E, id.as_bytes()), (0x0427, &[state])],
            timeout,
        )
        .await
    }
}
