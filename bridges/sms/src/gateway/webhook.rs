//! Webhook helpers shared by the gateways: query/form parsing to bytes, constant-time secret
//! comparison, the IP allow-list, per-message DLR tokens and text decoding.

use std::{collections::BTreeMap, net::IpAddr};

use hmac::{Hmac, Mac};
use subtle::ConstantTimeEq;

/// Parses `a=1&b=x%20y+z` into raw byte values (`+` is a space; the last of repeated keys wins
/// in the map; see [`parse_pairs`] for all pairs in order).
pub fn parse_query(query: &str) -> BTreeMap<String, Vec<u8>> {
    parse_pairs(query).into_iter().collect()
}

/// Parses `a=1&b=2&a=3` into pairs in order, values as raw bytes, keys lossily as UTF-8.
pub fn parse_pairs(query: &str) -> Vec<(String, Vec<u8>)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (String::from_utf8_lossy(&decode(k)).into_owned(), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> Vec<u8> {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus).collect()
}

/// A value as UTF-8 text (lossy), or empty when absent.
pub fn text(map: &BTreeMap<String, Vec<u8>>, key: &str) -> String {
    map.get(key).map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default()
}

/// Compares two secrets in constant time (length differences are not hidden).
pub fn secret_eq(given: &[u8], expected: &[u8]) -> bool {
    given.ct_eq(expected).into()
}

/// A hex HMAC-SHA1 token binding `message_id` to the webhook secret (put in DLR URLs instead of
/// the secret itself, so a leaked URL only speaks for one message).
pub fn message_token(secret: &str, message_id: &str) -> String {
    let mut mac =
        Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(b"trestle-sms-dlr\0");
    mac.update(message_id.as_bytes());
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes message text in the charset a gateway names: UTF-8, UTF-16BE / UCS-2, or
/// ISO-8859-1 / Windows-1252 (as Latin-1). Unknown charsets are tried as UTF-8, then Latin-1.
pub fn decode_text(bytes: &[u8], charset: &str) -> String {
    let cs = charset.trim().to_ascii_uppercase().replace('_', "-");
    match cs.as_str() {
        "UTF-16BE" | "UTF16-BE" | "UCS-2" | "UCS2" | "UTF-16" => {
            let units: Vec<u16> = bytes
                .chunks(2)
                .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        "ISO-8859-1" | "LATIN1" | "WINDOWS-1252" => bytes.iter().map(|&b| char::from(b)).collect(),
        _ => match std::str::from_utf8(bytes) {
            Ok(s) => s.to_owned(),
            Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
        },
    }
}

/// An allow-list of source addresses (`10.0.0.0/8`, `::1`, `192.0.2.7`). Empty allows all.
#[derive(Debug, Clone, Default)]
pub struct IpAllowList(Vec<(IpAddr, u8)>);

/// A malformed allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an IP address or CIDR prefix: {0}")]
pub struct BadNet(pub String);

impl IpAllowList {
    /// Parses the entries.
    pub fn parse(entries: &[String]) -> Result<Self, BadNet> {
        entries
            .iter()
            .map(|e| {
                let (addr, len) = match e.split_once('/') {
                    Some((a, l)) => (a, Some(l)),
                    None => (e.as_str(), None),
                };
                let ip: IpAddr = addr.trim().parse().map_err(|_| BadNet(e.clone()))?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let len = match len {
                    Some(l) => l
                        .trim()
                        .parse::<u8>()
                        .ok()
                        .filter(|l| *l <= max)
                        .ok_or_else(|| BadNet(e.clone()))?,
                    None => max,
                };
                Ok((ip, len))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Whether `ip` may call the webhooks.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.is_empty()
            || self.0.iter().any(|(net, len)| match (net, ip) {
                (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), *len),
                (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), *len),
                _ => false,
            })
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = usize::from(bits);
    let (full, rest) = (bits / 8, bits % 8);
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[full] & mask == b[full] & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing_keeps_bytes() {
        let q = parse_query("from=%2B447700900123&text=caf%C3%A9+ok&raw=%FF%00&flag&to=");
        assert_eq!(text(&q, "from"), "+447700900123");
        assert_eq!(text(&q, "text"), "café ok");
        assert_eq!(q["raw"], vec![0xff, 0x00]);
        assert_eq!(text(&q, "flag"), "");
        assert_eq!(text(&q, "missing"), "");
        assert_eq!(parse_pairs("a=1&a=2").len(), 2);
    }

    #[test]
    fn secrets() {
        assert!(secret_eq(b"s3cret", b"s3cret"));
        assert!(!secret_eq(b"s3cret", b"s3creT"));
        assert!(!secret_eq(b"", b"s3cret"));
        let t = message_token("k", "id1");
        assert_eq!(t.len(), 40);
        assert_eq!(t, message_token("k", "id1"));
        assert_ne!(t, message_token("k", "id2"));
        assert_ne!(t, message_token("k2", "id1"));
    }

    #[test]
    fn charsets() {
        assert_eq!(decode_text("héllo".as_bytes(), "UTF-8"), "héllo");
        assert_eq!(decode_text(&[0x04, 0x1f, 0xd8, 0x3d, 0xde, 0x42], "UTF-16BE"), "П🙂");
        assert_eq!(decode_text(&[0x68, 0xe9], "ISO-8859-1"), "hé");
        assert_eq!(decode_text(&[0x68, 0xe9], ""), "hé");
        assert_eq!(decode_text(b"plain", "gsm"), "plain");
    }

    #[test]
    fn allow_list() {
        let l =
            IpAllowList::parse(&["127.0.0.1".into(), "10.1.0.0/16".into(), "2001:db8::/32".into()])
                .unwrap();
        assert!(l.allows("127.0.0.1".parse().unwrap()));
        assert!(l.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(l.allows("10.1.200.3".parse().unwrap()));
        assert!(!l.allows("10.2.0.1".parse().unwrap()));
        assert!(l.allows("2001:db8:5::1".parse().unwrap()));
        assert!(!l.allows("2001:db9::1".parse().unwrap()));
        assert!(!l.allows("127.0.0.2".parse().unwrap()));
        assert!(IpAllowList::default().allows("203.0.113.9".parse().unwrap()));
        let odd = IpAllowList::parse(&["192.168.0.0/23".into()]).unwrap();
        assert!(odd.allows("192.168.1.9".parse().unwrap()));
        assert!(!odd.allows("192.168.2.1".parse().unwrap()));
        assert!(IpAllowList::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(IpAllowList::parse(&["nope".into()]).is_err());
    }
}
