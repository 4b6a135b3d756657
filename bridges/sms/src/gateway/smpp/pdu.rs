//! SMPP 3.4 PDU codec: framing, the PDUs an ESME needs, TLVs, concatenation UDH and delivery
//! receipt texts. Decoding never panics: every length is checked, a malformed PDU is an error.
//! Field and constant names are the SMPP 3.4 specification's.
#![allow(missing_docs)]

use std::fmt;

/// Command ids.
pub mod cmd {
    pub const GENERIC_NACK: u32 = 0x8000_0000;
    pub const BIND_TRANSCEIVER: u32 = 0x0000_0009;
    pub const BIND_TRANSCEIVER_RESP: u32 = 0x8000_0009;
    pub const SUBMIT_SM: u32 = 0x0000_0004;
    pub const SUBMIT_SM_RESP: u32 = 0x8000_0004;
    pub const DELIVER_SM: u32 = 0x0000_0005;
    pub const DELIVER_SM_RESP: u32 = 0x8000_0005;
    pub const UNBIND: u32 = 0x0000_0006;
    pub const UNBIND_RESP: u32 = 0x8000_0006;
    pub const ENQUIRE_LINK: u32 = 0x0000_0015;
    pub const ENQUIRE_LINK_RESP: u32 = 0x8000_0015;
}

/// Command status values used here.
pub mod status {
    pub const OK: u32 = 0x0000_0000;
    pub const INVMSGLEN: u32 = 0x0000_0001;
    pub const INVCMDLEN: u32 = 0x0000_0002;
    pub const INVCMDID: u32 = 0x0000_0003;
    pub const SYSERR: u32 = 0x0000_0008;
    pub const THROTTLED: u32 = 0x0000_0058;
    pub const RX_T_APPN: u32 = 0x0000_0064;
}

/// TLV tags used here.
pub mod tag {
    pub const RECEIPTED_MESSAGE_ID: u16 = 0x001E;
    pub const MESSAGE_PAYLOAD: u16 = 0x0424;
    pub const MESSAGE_STATE: u16 = 0x0427;
}

/// The largest PDU accepted (the spec sets no limit; real PDUs are far smaller).
pub const MAX_PDU: usize = 64 * 1024;

/// A decoding error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PduError {
    /// The command_length is below 16 or above [`MAX_PDU`].
    BadLength(u32),
    /// The body ended inside a field.
    Truncated(&'static str),
    /// A C-octet string had no terminating NUL within its maximum size.
    Unterminated(&'static str),
    /// A field's value is not allowed.
    Invalid(&'static str),
}

impl fmt::Display for PduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadLength(n) => write!(f, "bad command_length {n}"),
            Self::Truncated(w) => write!(f, "PDU truncated in {w}"),
            Self::Unterminated(w) => write!(f, "unterminated C-string {w}"),
            Self::Invalid(w) => write!(f, "invalid {w}"),
        }
    }
}

impl std::error::Error for PduError {}

/// A PDU: header plus raw body (bodies are decoded by the typed functions below).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub command_id: u32,
    pub status: u32,
    pub sequence: u32,
    pub body: Vec<u8>,
}

impl Pdu {
    /// A PDU with this body and status 0.
    pub fn new(command_id: u32, sequence: u32, body: Vec<u8>) -> Self {
        Self { command_id, status: status::OK, sequence, body }
    }

    /// The response PDU id for a request id.
    pub fn is_response(&self) -> bool {
        self.command_id & 0x8000_0000 != 0
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        let len = u32::try_from(16 + self.body.len()).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(16 + self.body.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.command_id.to_be_bytes());
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

/// Takes one PDU off the front of `buf`: `Ok(None)` when more bytes are needed, `Err` when the
/// header is unusable (the stream cannot be resynchronised: the connection must be dropped).
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Pdu, usize)>, PduError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let ulen = len as usize;
    if !(16..=MAX_PDU).contains(&ulen) {
        return Err(PduError::BadLength(len));
    }
    if buf.len() < ulen {
        return Ok(None);
    }
    let word = |i: usize| u32::from_be_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    Ok(Some((
        Pdu {
            command_id: word(4),
            status: word(8),
            sequence: word(12),
            body: buf[16..ulen].to_vec(),
        },
        ulen,
    )))
}

/// A bounds-checked reader over a body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, PduError> {
        let b = *self.buf.get(self.pos).ok_or(PduError::Truncated(what))?;
        self.pos += 1;
        Ok(b)
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], PduError> {
        let end = self.pos.checked_add(n).ok_or(PduError::Truncated(what))?;
        let s = self.buf.get(self.pos..end).ok_or(PduError::Truncated(what))?;
        self.pos = end;
        Ok(s)
    }

    /// A C-octet string of at most `max` bytes including the NUL.
    fn cstr(&mut self, max: usize, what: &'static str) -> Result<String, PduError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let Some(nul) = rest.iter().take(max).position(|&b| b == 0) else {
            return Err(if rest.len() < max {
                PduError::Truncated(what)
            } else {
                PduError::Unterminated(what)
            });
        };
        let s = String::from_utf8_lossy(&rest[..nul]).into_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
}

fn put_cstr(out: &mut Vec<u8>, s: &str, max: usize) {
    let b = s.as_bytes();
    out.extend_from_slice(&b[..b.len().min(max.saturating_sub(1))]);
    out.push(0);
}

/// bind_transceiver body (interface version 3.4, no address range).
pub fn bind_transceiver(system_id: &str, password: &str, system_type: &str) -> Vec<u8> {
    let mut b = Vec::new();
    put_cstr(&mut b, system_id, 16);
    put_cstr(&mut b, password, 9);
    put_cstr(&mut b, system_type, 13);
    b.push(0x34); // interface_version
    b.push(0); // addr_ton
    b.push(0); // addr_npi
    b.push(0); // address_range ""
    b
}

/// The system_id of a bind_*_resp (empty when the body is empty, as for an error response).
pub fn bind_resp_system_id(body: &[u8]) -> Result<String, PduError> {
    if body.is_empty() {
        return Ok(String::new());
    }
    Reader::new(body).cstr(16, "system_id")
}

/// The message_id of a submit_sm_resp (an error response may have no body).
pub fn submit_resp_message_id(body: &[u8]) -> Result<String, PduError> {
    if body.is_empty() {
        return Ok(String::new());
    }
    Reader::new(body).cstr(65, "message_id")
}

/// An address: type of number, numbering plan, digits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Address {
    pub ton: u8,
    pub npi: u8,
    pub addr: String,
}

impl Address {
    /// An E.164 number (`+44…` → TON international, NPI ISDN, digits without `+`); a short
    /// code (digits) → TON unknown, NPI ISDN; letters → alphanumeric.
    pub fn from_number(n: &str) -> Self {
        if let Some(d) = n.strip_prefix('+') {
            Self { ton: 1, npi: 1, addr: d.to_owned() }
        } else if n.chars().all(|c| c.is_ascii_digit()) {
            Self { ton: 0, npi: 1, addr: n.to_owned() }
        } else {
            Self { ton: 5, npi: 0, addr: n.to_owned() }
        }
    }

    /// Back to the bridge's form: international numbers get their `+`.
    pub fn to_number(&self) -> String {
        if self.ton == 1 && !self.addr.starts_with('+') {
            format!("+{}", self.addr)
        } else {
            self.addr.clone()
        }
    }
}

/// The body shared by submit_sm and deliver_sm.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShortMessage {
    pub service_type: String,
    pub source: Address,
    pub dest: Address,
    pub esm_class: u8,
    pub protocol_id: u8,
    pub priority: u8,
    pub schedule_delivery_time: String,
    pub validity_period: String,
    pub registered_delivery: u8,
    pub replace_if_present: u8,
    pub data_coding: u8,
    pub sm_default_msg_id: u8,
    /// The short_message field (UDH included when `esm_class & 0x40`).
    pub short_message: Vec<u8>,
    /// Optional parameters, in order.
    pub tlvs: Vec<(u16, Vec<u8>)>,
}

/// esm_class bit: the short message starts with a user data header.
pub const ESM_UDHI: u8 = 0x40;
/// esm_class message type: SMSC delivery receipt.
pub const ESM_RECEIPT: u8 = 0x04;

impl ShortMessage {
    /// Encodes the body (short_message longer than 254 bytes is cut: use message_payload).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_cstr(&mut b, &self.service_type, 6);
        for a in [&self.source, &self.dest] {
            b.push(a.ton);
            b.push(a.npi);
            put_cstr(&mut b, &a.addr, 21);
        }
        b.extend_from_slice(&[self.esm_class, self.protocol_id, self.priority]);
        put_cstr(&mut b, &self.schedule_delivery_time, 17);
        put_cstr(&mut b, &self.validity_period, 17);
        b.extend_from_slice(&[
            self.registered_delivery,
            self.replace_if_present,
            self.data_coding,
            self.sm_default_msg_id,
        ]);
        let sm = &self.short_message[..self.short_message.len().min(254)];
        b.push(u8::try_from(sm.len()).unwrap_or(254));
        b.extend_from_slice(sm);
        for (t, v) in &self.tlvs {
            b.extend_from_slice(&t.to_be_bytes());
            b.extend_from_slice(&u16::try_from(v.len()).unwrap_or(u16::MAX).to_be_bytes());
            b.extend_from_slice(&v[..v.len().min(usize::from(u16::MAX))]);
        }
        b
    }

    /// Decodes a submit_sm / deliver_sm body.
    pub fn decode(body: &[u8]) -> Result<Self, PduError> {
        let mut r = Reader::new(body);
        let service_type = r.cstr(6, "service_type")?;
        let mut addr = |what| -> Result<Address, PduError> {
            Ok(Address { ton: r.u8(what)?, npi: r.u8(what)?, addr: r.cstr(21, what)? })
        };
        let source = addr("source_addr")?;
        let dest = addr("destination_addr")?;
        let esm_class = r.u8("esm_class")?;
        let protocol_id = r.u8("protocol_id")?;
        let priority = r.u8("priority_flag")?;
        let schedule_delivery_time = r.cstr(17, "schedule_delivery_time")?;
        let validity_period = r.cstr(17, "validity_period")?;
        let registered_delivery = r.u8("registered_delivery")?;
        let replace_if_present = r.u8("replace_if_present_flag")?;
        let data_coding = r.u8("data_coding")?;
        let sm_default_msg_id = r.u8("sm_default_msg_id")?;
        let sm_length = r.u8("sm_length")?;
        if sm_length > 254 {
            return Err(PduError::Invalid("sm_length"));
        }
        let short_message = r.bytes(usize::from(sm_length), "short_message")?.to_vec();
        let mut tlvs = Vec::new();
        while !r.done() {
            let t = r.bytes(2, "TLV tag")?;
            let l = r.bytes(2, "TLV length")?;
            let len = u16::from_be_bytes([l[0], l[1]]);
            let v = r.bytes(usize::from(len), "TLV value")?;
            tlvs.push((u16::from_be_bytes([t[0], t[1]]), v.to_vec()));
        }
        Ok(Self {
            service_type,
            source,
            dest,
            esm_class,
            protocol_id,
            priority,
            schedule_delivery_time,
            validity_period,
            registered_delivery,
            replace_if_present,
            data_coding,
            sm_default_msg_id,
            short_message,
            tlvs,
        })
    }

    /// The message's user data: the `message_payload` TLV when short_message is empty (how
    /// long messages travel without concatenation), else short_message.
    pub fn user_data(&self) -> &[u8] {
        match self.tlv(tag::MESSAGE_PAYLOAD) {
            Some(payload) if self.short_message.is_empty() => payload,
            _ => &self.short_message,
        }
    }

    /// A TLV's value.
    pub fn tlv(&self, tag: u16) -> Option<&[u8]> {
        self.tlvs.iter().find(|(t, _)| *t == tag).map(|(_, v)| v.as_slice())
    }

    /// The user data header (if `esm_class` says there is one and it is well formed) and the
    /// text bytes after it.
    pub fn split_udh(&self) -> (Option<&[u8]>, &[u8]) {
        let sm = self.user_data();
        if self.esm_class & ESM_UDHI != 0
            && let Some(&udhl) = sm.first()
            && sm.len() > usize::from(udhl)
        {
            let end = 1 + usize::from(udhl);
            return (Some(&sm[..end]), &sm[end..]);
        }
        (None, sm)
    }
}

/// Concatenation info in a UDH (IEI 0x00, 8-bit reference, or 0x08, 16-bit): (ref, total, seq).
pub fn udh_concat(udh: &[u8]) -> Option<(u16, u8, u8)> {
    let body = udh.get(1..)?;
    let mut i = 0;
    while i + 2 <= body.len() {
        let (iei, len) = (body[i], usize::from(body[i + 1]));
        let v = body.get(i + 2..i + 2 + len)?;
        match (iei, v) {
            (0x00, [r, t, s]) => return Some((u16::from(*r), *t, *s)),
            (0x08, [r1, r2, t, s]) => return Some((u16::from_be_bytes([*r1, *r2]), *t, *s)),
            _ => {}
        }
        i += 2 + len;
    }
    None
}

/// The 8-bit-reference concatenation UDH `05 00 03 ref total seq`.
pub fn concat_udh(reference: u8, total: u8, seq: u8) -> [u8; 6] {
    [0x05, 0x00, 0x03, reference, total, seq]
}

/// A delivery receipt's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The message id the SMSC gave in submit_sm_resp.
    pub message_id: String,
    /// `DELIVRD`, `UNDELIV`, `EXPIRED`, `REJECTD`, `DELETED`, `ACCEPTD`, `ENROUTE`, `UNKNOWN`.
    pub stat: String,
    /// The `err:` field, if any.
    pub err: Option<String>,
}

/// message_state TLV values → the receipt's `stat` words.
fn state_word(state: u8) -> Option<&'static str> {
    Some(match state {
        1 => "ENROUTE",
        2 => "DELIVRD",
        3 => "EXPIRED",
        4 => "DELETED",
        5 => "UNDELIV",
        6 => "ACCEPTD",
        7 => "UNKNOWN",
        8 => "REJECTD",
        _ => return None,
    })
}

/// Parses a delivery receipt from its TLVs (`receipted_message_id`, `message_state`), falling
/// back to the conventional text `id:… sub:… dlvrd:… submit date:… done date:… stat:… err:…`.
pub fn parse_receipt(sm: &ShortMessage) -> Option<Receipt> {
    let text = String::from_utf8_lossy(&sm.short_message);
    let field = |name: &str| -> Option<String> {
        let lower = text.to_ascii_lowercase();
        let mut from = 0;
        while let Some(i) = lower[from..].find(name) {
            let at = from + i;
            // A field name starts the text or follows a space.
            if at == 0 || lower.as_bytes()[at - 1] == b' ' {
                let v = &text[at + name.len()..];
                return Some(v.split(' ').next().unwrap_or_default().to_owned());
            }
            from = at + name.len();
        }
        None
    };
    let tlv_id = sm
        .tlv(tag::RECEIPTED_MESSAGE_ID)
        .map(|v| {
            String::from_utf8_lossy(v.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
        })
        .filter(|s| !s.is_empty());
    let message_id = tlv_id.or_else(|| field("id:").filter(|s| !s.is_empty()))?;
    let tlv_stat = sm.tlv(tag::MESSAGE_STATE).and_then(|v| v.first()).and_then(|&s| state_word(s));
    let stat = tlv_stat
        .map(str::to_owned)
        .or_else(|| field("stat:").map(|s| s.to_ascii_uppercase()))
        .unwrap_or_else(|| "UNKNOWN".to_owned());
    Some(Receipt { message_id, stat, err: field("err:") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ShortMessage {
        ShortMessage {
            source: Address::from_number("+441234567890"),
            dest: Address::from_number("+447700900123"),
            esm_class: ESM_UDHI,
            registered_delivery: 1,
            data_coding: 8,
            short_message: [&concat_udh(7, 2, 1)[..], &[0, 0x41, 0, 0x42]].concat(),
            tlvs: vec![(0x1234, vec![1, 2, 3])],
            ..Default::default()
        }
    }

    #[test]
    fn header_round_trip() {
        let p = Pdu { command_id: cmd::SUBMIT_SM, status: 0x58, sequence: 42, body: vec![1, 2] };
        let wire = p.encode();
        assert_eq!(&wire[..4], &[0, 0, 0, 18]);
        assert_eq!(decode_frame(&wire), Ok(Some((p, 18))));
        // Byte-exact known PDU: enquire_link seq 1.
        let el = Pdu::new(cmd::ENQUIRE_LINK, 1, vec![]).encode();
        assert_eq!(el, [0, 0, 0, 16, 0, 0, 0, 0x15, 0, 0, 0, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn frames_need_all_bytes() {
        let wire = Pdu::new(cmd::ENQUIRE_LINK, 9, vec![]).encode();
        for n in 0..wire.len() {
            assert_eq!(decode_frame(&wire[..n]), Ok(None), "{n} bytes");
        }
        // Two PDUs back to back: the first is taken, the rest stays.
        let two = [wire.clone(), wire].concat();
        assert_eq!(decode_frame(&two).unwrap().unwrap().1, 16);
    }

    #[test]
    fn bad_lengths_are_errors() {
        for len in [0u32, 1, 15, (MAX_PDU + 1) as u32, u32::MAX] {
            let mut w = len.to_be_bytes().to_vec();
            w.extend_from_slice(&[0; 20]);
            assert_eq!(decode_frame(&w), Err(PduError::BadLength(len)));
        }
    }

    #[test]
    fn short_message_round_trip() {
        let sm = sample();
        let body = sm.encode();
        assert_eq!(ShortMessage::decode(&body), Ok(sm.clone()));
        let (udh, text) = sm.split_udh();
        assert_eq!(udh_concat(udh.unwrap()), Some((7, 2, 1)));
        assert_eq!(text, &[0, 0x41, 0, 0x42]);
    }

    #[test]
    fn truncated_bodies_never_panic() {
        let body = sample().encode();
        let without_tlvs = body.len() - 7;
        for n in 0..body.len() {
            // Every prefix fails, except the one that ends exactly before the TLVs.
            let r = ShortMessage::decode(&body[..n]);
            if n == without_tlvs {
                assert!(r.unwrap().tlvs.is_empty());
            } else {
                assert!(r.is_err(), "prefix of {n} bytes decoded: {r:?}");
            }
        }
        // Arbitrary garbage.
        let mut x: u32 = 0x1234_5678;
        for len in 0..300 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x & 0xff) as u8
                })
                .collect();
            let _ = ShortMessage::decode(&junk);
            let _ = decode_frame(&junk);
            let _ = submit_resp_message_id(&junk);
            let _ = bind_resp_system_id(&junk);
            let _ = udh_concat(&junk);
        }
    }

    #[test]
    fn overlong_fields_are_errors() {
        // service_type without a NUL in its 6 bytes.
        assert_eq!(
            ShortMessage::decode(b"ABCDEFGH\0"),
            Err(PduError::Unterminated("service_type"))
        );
        // sm_length pointing past the end.
        let mut body = ShortMessage::default().encode();
        let n = body.len();
        body[n - 1] = 10;
        assert_eq!(ShortMessage::decode(&body), Err(PduError::Truncated("short_message")));
        // sm_length 255 is not allowed.
        body[n - 1] = 255;
        body.extend_from_slice(&[0; 255]);
        assert_eq!(ShortMessage::decode(&body), Err(PduError::Invalid("sm_length")));
        // A TLV whose length runs past the end.
        let mut body = ShortMessage::default().encode();
        body.extend_from_slice(&[0x00, 0x1E, 0x00, 0x09, b'a']);
        assert_eq!(ShortMessage::decode(&body), Err(PduError::Truncated("TLV value")));
        let mut body = ShortMessage::default().encode();
        body.push(0x00);
        assert_eq!(ShortMessage::decode(&body), Err(PduError::Truncated("TLV tag")));
    }

    #[test]
    fn bind_and_resp() {
        let b = bind_transceiver("bridge", "secret", "");
        assert_eq!(b, b"bridge\0secret\0\0\x34\0\0\0");
        // Overlong values are cut to the field size.
        let b = bind_transceiver("a-very-long-system-id", "password12", "x");
        assert_eq!(&b[..16], b"a-very-long-sys\0");
        assert_eq!(&b[16..25], b"password\0");
        assert_eq!(bind_resp_system_id(b"SMSC\0"), Ok("SMSC".into()));
        assert_eq!(bind_resp_system_id(b""), Ok(String::new()));
        assert_eq!(bind_resp_system_id(b"SMSC"), Err(PduError::Truncated("system_id")));
        assert_eq!(submit_resp_message_id(b"abc123\0"), Ok("abc123".into()));
        assert!(submit_resp_message_id(&[b'a'; 80]).is_err());
    }

    #[test]
    fn addresses() {
        let a = Address::from_number("+447700900123");
        assert_eq!((a.ton, a.npi, a.addr.as_str()), (1, 1, "447700900123"));
        assert_eq!(a.to_number(), "+447700900123");
        assert_eq!(Address::from_number("12345").to_number(), "12345");
        assert_eq!(Address::from_number("MyBank").ton, 5);
    }

    #[test]
    fn udh_variants() {
        assert_eq!(udh_concat(&[5, 0, 3, 9, 3, 2]), Some((9, 3, 2)));
        assert_eq!(udh_concat(&[6, 8, 4, 1, 2, 3, 1]), Some((0x0102, 3, 1)));
        // Another IE first (port addressing 0x05), then concatenation.
        assert_eq!(udh_concat(&[11, 5, 4, 0, 1, 0, 2, 0, 3, 9, 3, 2]), Some((9, 3, 2)));
        assert_eq!(udh_concat(&[5, 0, 3, 9]), None);
        assert_eq!(udh_concat(&[]), None);
        // A UDH length longer than the message: no UDH.
        let sm = ShortMessage {
            esm_class: ESM_UDHI,
            short_message: vec![9, 0, 3],
            ..Default::default()
        };
        assert_eq!(sm.split_udh(), (None, &[9u8, 0, 3][..]));
    }

    #[test]
    fn receipts() {
        let sm = ShortMessage {
            esm_class: ESM_RECEIPT,
            short_message: b"id:abc123 sub:001 dlvrd:001 submit date:2611231200 done date:2611231201 stat:DELIVRD err:000 text:hello".to_vec(),
            ..Default::default()
        };
        assert_eq!(
            parse_receipt(&sm),
            Some(Receipt {
                message_id: "abc123".into(),
                stat: "DELIVRD".into(),
                err: Some("000".into())
            })
        );
        // TLVs win over the text.
        let mut sm2 = sm;
        sm2.tlvs =
            vec![(tag::RECEIPTED_MESSAGE_ID, b"xyz\0".to_vec()), (tag::MESSAGE_STATE, vec![5])];
        let r = parse_receipt(&sm2).unwrap();
        assert_eq!((r.message_id.as_str(), r.stat.as_str()), ("xyz", "UNDELIV"));
        // TLVs only.
        let sm3 = ShortMessage {
            esm_class: ESM_RECEIPT,
            tlvs: vec![
                (tag::RECEIPTED_MESSAGE_ID, b"m1\0".to_vec()),
                (tag::MESSAGE_STATE, vec![2]),
            ],
            ..Default::default()
        };
        assert_eq!(parse_receipt(&sm3).unwrap().stat, "DELIVRD");
        // "id:" inside another word is not the id field; no id at all → None.
        let sm4 =
            ShortMessage { short_message: b"msgid:1 stat:DELIVRD".to_vec(), ..Default::default() };
        assert_eq!(parse_receipt(&sm4), None);
        let sm5 = ShortMessage { short_message: vec![0xff, 0xfe], ..Default::default() };
        assert_eq!(parse_receipt(&sm5), None);
    }
}
