//! Matrix user-id localparts from arbitrary remote names: always spec-valid, lowercase, and
//! reversible.
//!
//! The mapping follows the spec's recommendation ("Mapping from other character sets"):
//! `_` → `__`, an uppercase ASCII letter `X` → `_x`, every other byte that is not allowed
//! (`a-z 0-9 . = - /` plus the characters the caller keeps) → `=xx` (lowercase hex of each UTF-8
//! byte). `=` itself is escaped, so the mapping is injective and [`unescape_localpart`] reverses it.

/// Why an escaped localpart cannot be reversed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EscapeError {
    /// A `_` not followed by `_` or a lowercase letter, or a bad `=xx`.
    #[error("invalid escape at byte {0}")]
    BadEscape(usize),
    /// The bytes are not UTF-8 once unescaped.
    #[error("unescaped bytes are not UTF-8")]
    NotUtf8,
    /// A character that escaping never produces.
    #[error("character {0:?} cannot appear in an escaped localpart")]
    BadChar(char),
}

fn plain(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'/')
}

/// Escapes `s` into a valid lowercase localpart.
pub fn escape_localpart(s: &str) -> String {
    escape_localpart_keep(s, &[])
}

/// Like [`escape_localpart`], but characters in `keep` that are valid in localparts (`+` is the
/// useful one: phone numbers) pass through unescaped.
pub fn escape_localpart_keep(s: &str, keep: &[char]) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let mut buf = [0u8; 4];
        let bytes = c.encode_utf8(&mut buf).as_bytes();
        if bytes.len() == 1 {
            let b = bytes[0];
            if plain(b) || (keep.contains(&c) && b == b'+') {
                out.push(c);
                continue;
            }
            if b == b'_' {
                out.push_str("__");
                continue;
            }
            if b.is_ascii_uppercase() {
                out.push('_');
                out.push(c.to_ascii_lowercase());
                continue;
            }
        }
        for b in bytes {
            out.push_str(&format!("={b:02x}"));
        }
    }
    out
}

/// Reverses [`escape_localpart`] (and [`escape_localpart_keep`] with `+`).
pub fn unescape_localpart(s: &str) -> Result<String, EscapeError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'_' => match b.get(i + 1) {
                Some(b'_') => {
                    out.push(b'_');
                    i += 2;
                }
                Some(c @ b'a'..=b'z') => {
                    out.push(c.to_ascii_uppercase());
                    i += 2;
                }
                _ => return Err(EscapeError::BadEscape(i)),
            },
            b'=' => {
                let hex = s.get(i + 1..i + 3).ok_or(EscapeError::BadEscape(i))?;
                if !hex.bytes().all(|h| matches!(h, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err(EscapeError::BadEscape(i));
                }
                out.push(u8::from_str_radix(hex, 16).map_err(|_| EscapeError::BadEscape(i))?);
                i += 3;
            }
            c if plain(c) || c == b'+' => {
                out.push(c);
                i += 1;
            }
            _ => {
                let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
                return Err(EscapeError::BadChar(ch));
            }
        }
    }
    String::from_utf8(out).map_err(|_| EscapeError::NotUtf8)
}

/// Whether `s` is a valid (current grammar) localpart.
pub fn is_valid_localpart(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| plain(b) || matches!(b, b'_' | b'=' | b'+'))
}

/// Whether `s` is a valid user id: `@localpart:server`, at most 255 bytes. Historical
/// localparts (any printable ASCII but `:`) are accepted, as servers must.
pub fn is_valid_user_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('@') else { return false };
    let Some((local, server)) = rest.split_once(':') else { return false };
    s.len() <= 255
        && !local.is_empty()
        && local.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b':')
        && is_valid_server_name(server)
}

/// Whether `s` is a valid room alias: `#localpart:server`, at most 255 bytes.
pub fn is_valid_room_alias(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('#') else { return false };
    let Some((local, server)) = rest.split_once(':') else { return false };
    s.len() <= 255
        && !local.is_empty()
        && !local.chars().any(|c| c.is_control() || c == ':')
        && is_valid_server_name(server)
}

fn is_valid_server_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples_and_round_trips() {
        assert_eq!(escape_localpart("Alice"), "_alice");
        assert_eq!(escape_localpart("a_b"), "a__b");
        assert_eq!(escape_localpart("a=b"), "a=3db");
        assert_eq!(escape_localpart("#chan"), "=23chan");
        assert_eq!(escape_localpart("ü"), "=c3=bc");
        assert_eq!(escape_localpart_keep("+447700900123", &['+']), "+447700900123");
        assert_eq!(escape_localpart("+44"), "=2b44");
        let samples = [
            "",
            "Alice",
            "bob_",
            "__",
            "=",
            "=3d",
            "a b",
            "日本語",
            "👍🏽",
            "x\0y",
            "CamelCase_Name",
            "with:colon",
            "@at",
            "#chan/sub",
            "tab\tnew\nline",
            "Ω",
            "+1",
            "-._/",
            "ALLCAPS",
        ];
        for s in samples {
            let e = escape_localpart(s);
            if !s.is_empty() {
                assert!(is_valid_localpart(&e), "{s:?} -> {e:?}");
            }
            assert!(e.bytes().all(|b| !b.is_ascii_uppercase()));
            assert_eq!(unescape_localpart(&e).unwrap(), s, "{e}");
            let k = escape_localpart_keep(s, &['+']);
            assert_eq!(unescape_localpart(&k).unwrap(), s);
        }
    }

    #[test]
    fn injective_on_tricky_pairs() {
        let pairs = [("A", "_a"), ("a_", "a__"), ("=", "=3d"), ("é", "=c3=a9")];
        for (a, b) in pairs {
            assert_ne!(escape_localpart(a), escape_localpart(b));
        }
    }

    #[test]
    fn strict_unescape() {
        assert!(unescape_localpart("_").is_err());
        assert!(unescape_localpart("_A").is_err());
        assert!(unescape_localpart("=4").is_err());
        assert!(unescape_localpart("=zz").is_err());
        assert!(unescape_localpart("=C3").is_err());
        assert!(unescape_localpart("=c3").is_err());
        assert!(unescape_localpart("A").is_err());
        assert!(unescape_localpart("a b").is_err());
    }

    #[test]
    fn id_validation() {
        assert!(is_valid_user_id("@a:example.org"));
        assert!(is_valid_user_id("@sms_+447700900123:example.org"));
        assert!(!is_valid_user_id("@:x"));
        assert!(!is_valid_user_id("a:x"));
        assert!(!is_valid_user_id(&format!("@{}:x", "a".repeat(260))));
        assert!(is_valid_room_alias("#irc_local_#test:example.org"));
        assert!(!is_valid_room_alias("#a\n:x"));
    }
}
