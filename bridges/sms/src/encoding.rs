//! SMS text encoding: GSM 03.38 7-bit detection (basic table plus extension table), UCS-2
//! fallback, segment counting and splitting.
//!
//! | Encoding | One part | Each part of a concatenated message (8-bit reference UDH) |
//! |---|---|---|
//! | GSM-7 | 160 septets | 153 septets |
//! | UCS-2 | 70 UTF-16 units | 67 UTF-16 units |
//!
//! Extension-table characters (`{ } [ ] ~ \ | ^ €` and form feed) take two septets (escape +
//! code) and are never split across parts; neither are UTF-16 surrogate pairs (emoji), since
//! splitting works on whole characters.

/// The GSM 03.38 basic character set (escape 0x1B excluded: it is not text).
const BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";

/// The GSM 03.38 extension table (each is sent as escape + code: two septets).
const EXTENSION: &str = "\u{0C}^{}\\[~]|€";

/// How a text is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// GSM 03.38 7-bit default alphabet.
    Gsm7,
    /// UCS-2 (UTF-16 in practice).
    Ucs2,
}

impl Encoding {
    /// Units (septets or UTF-16 code units) in a single-part message.
    pub fn single_limit(self) -> usize {
        match self {
            Self::Gsm7 => 160,
            Self::Ucs2 => 70,
        }
    }

    /// Units per part of a concatenated message (the UDH takes the rest).
    pub fn part_limit(self) -> usize {
        match self {
            Self::Gsm7 => 153,
            Self::Ucs2 => 67,
        }
    }

    /// The Kannel `coding` value (0 = 7-bit, 2 = UCS-2).
    pub fn kannel_coding(self) -> u8 {
        match self {
            Self::Gsm7 => 0,
            Self::Ucs2 => 2,
        }
    }

    /// Units `c` takes in this encoding.
    pub fn units(self, c: char) -> usize {
        match self {
            Self::Gsm7 => gsm7_septets(c).unwrap_or(1),
            Self::Ucs2 => c.len_utf16(),
        }
    }
}

/// Septets a character takes in GSM-7 (1 basic, 2 extension), or `None` if it has no GSM-7 form.
pub fn gsm7_septets(c: char) -> Option<usize> {
    if BASIC.contains(c) {
        Some(1)
    } else if EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// The encoding a text needs: GSM-7 when every character has a GSM-7 form, else UCS-2.
pub fn encoding_for(text: &str) -> Encoding {
    if text.chars().all(|c| gsm7_septets(c).is_some()) { Encoding::Gsm7 } else { Encoding::Ucs2 }
}

/// Units `text` takes in `encoding`.
pub fn length_in(text: &str, encoding: Encoding) -> usize {
    text.chars().map(|c| encoding.units(c)).sum()
}

/// A text split for sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segments {
    /// The encoding chosen.
    pub encoding: Encoding,
    /// Total units (septets or UTF-16 units).
    pub units: usize,
    /// The parts, in order (one part when the text fits in a single message; an empty text is
    /// one empty part).
    pub parts: Vec<String>,
}

impl Segments {
    /// How many SMS the text costs.
    pub fn count(&self) -> usize {
        self.parts.len()
    }
}

/// Chooses the encoding and splits `text` the way a concatenating gateway does.
pub fn segment(text: &str) -> Segments {
    let encoding = encoding_for(text);
    let units = length_in(text, encoding);
    if units <= encoding.single_limit() {
        return Segments { encoding, units, parts: vec![text.to_owned()] };
    }
    let limit = encoding.part_limit();
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut used = 0;
    for c in text.chars() {
        let u = encoding.units(c);
        if used + u > limit {
            parts.push(std::mem::take(&mut cur));
            used = 0;
        }
        cur.push(c);
        used += u;
    }
    if !cur.is_empty() {
        parts.push(cur);
    }
    Segments { encoding, units, parts }
}

/// The GSM 03.38 extension-table code of each [`EXTENSION`] character, in the same order.
const EXTENSION_CODES: [u8; 10] = [0x0A, 0x14, 0x28, 0x29, 0x2F, 0x3C, 0x3D, 0x3E, 0x40, 0x65];

/// The escape septet introducing an extension-table character.
const ESCAPE: u8 = 0x1B;

/// `text` as GSM 03.38 septets, one per octet (unpacked, as SMPP `data_coding` 0 carries them);
/// `None` if a character has no GSM-7 form.
pub fn gsm7_encode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        if let Some(i) = BASIC.chars().position(|b| b == c) {
            // BASIC skips the escape code 0x1B.
            out.push(u8::try_from(if i < 0x1B { i } else { i + 1 }).ok()?);
        } else if let Some(i) = EXTENSION.chars().position(|e| e == c) {
            out.extend_from_slice(&[ESCAPE, EXTENSION_CODES[i]]);
        } else {
            return None;
        }
    }
    Some(out)
}

/// Unpacked GSM 03.38 septets back to text (an unknown extension code reads as its basic-table
/// character, as 03.38 says; octets above 0x7F are masked).
pub fn gsm7_decode(septets: &[u8]) -> String {
    let basic = |code: u8| -> char {
        let code = usize::from(code & 0x7F);
        let i = if code < 0x1B {
            Some(code)
        } else if code > 0x1B {
            Some(code - 1)
        } else {
            None
        };
        i.and_then(|i| BASIC.chars().nth(i)).unwrap_or(' ')
    };
    let mut out = String::with_capacity(septets.len());
    let mut it = septets.iter().copied();
    while let Some(s) = it.next() {
        if s & 0x7F == ESCAPE {
            if let Some(e) = it.next() {
                match EXTENSION_CODES.iter().position(|&x| x == e & 0x7F) {
                    Some(i) => out.extend(EXTENSION.chars().nth(i)),
                    None => out.push(basic(e)),
                }
            }
        } else {
            out.push(basic(s));
        }
    }
    out
}

/// `text` as UCS-2 (UTF-16 big-endian) octets.
pub fn ucs2_encode(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_be_bytes).collect()
}

/// UTF-16BE octets back to text (an odd trailing octet is dropped, bad surrogates replaced).
pub fn ucs2_decode(octets: &[u8]) -> String {
    let units: Vec<u16> =
        octets.chunks_exact(2).map(|p| u16::from_be_bytes([p[0], p[1]])).collect();
    String::from_utf16_lossy(&units)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection() {
        assert_eq!(encoding_for("Hello @ £5, Ünïcode? no: ÄÖÑÜ§¿"), Encoding::Ucs2); // ï is not GSM
        assert_eq!(encoding_for("Hello @ £5 ÄÖÑÜ§¿ äöñüà ΔΦΓ"), Encoding::Gsm7);
        assert_eq!(encoding_for("braces {} [x] ~ \\ | ^ €"), Encoding::Gsm7);
        assert_eq!(encoding_for("smile 🙂"), Encoding::Ucs2);
        assert_eq!(encoding_for("Привет"), Encoding::Ucs2);
        assert_eq!(encoding_for("ç"), Encoding::Ucs2, "only capital Ç is in the basic table");
        assert_eq!(encoding_for("\u{1b}"), Encoding::Ucs2, "a bare escape is not text");
        assert_eq!(encoding_for(""), Encoding::Gsm7);
    }

    #[test]
    fn lengths() {
        assert_eq!(length_in("abc", Encoding::Gsm7), 3);
        assert_eq!(length_in("a{€", Encoding::Gsm7), 5);
        assert_eq!(length_in("a🙂", Encoding::Ucs2), 3);
    }

    #[test]
    fn single_part_limits() {
        assert_eq!(segment(&"a".repeat(160)).count(), 1);
        assert_eq!(segment(&"a".repeat(161)).count(), 2);
        assert_eq!(segment(&"{".repeat(80)).count(), 1);
        assert_eq!(segment(&"{".repeat(81)).count(), 2);
        assert_eq!(segment(&"я".repeat(70)).count(), 1);
        assert_eq!(segment(&"я".repeat(71)).count(), 2);
        assert_eq!(segment("").parts, vec![String::new()]);
    }

    #[test]
    fn gsm_split_matches_kannel() {
        // Seen through Kannel + fakesmsc: 200 GSM chars → 153 + 47.
        let s = segment(&"x".repeat(200));
        assert_eq!(s.encoding, Encoding::Gsm7);
        assert_eq!(s.parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [153, 47]);
        assert_eq!(segment(&"x".repeat(306)).count(), 2);
        assert_eq!(segment(&"x".repeat(307)).count(), 3);
    }

    #[test]
    fn escape_pairs_never_split() {
        // 100 '{' = 200 septets → 76 + 24 (a pair would straddle 152/153).
        let s = segment(&"{".repeat(100));
        assert_eq!(s.units, 200);
        assert_eq!(s.parts.iter().map(|p| p.chars().count()).collect::<Vec<_>>(), [76, 24]);
        // 152 plain then '{': the pair does not fit in the one septet left → next part.
        let text = format!("{}{{{}", "a".repeat(152), "b".repeat(8));
        let s = segment(&text);
        assert_eq!(s.units, 162);
        assert_eq!(s.parts, vec!["a".repeat(152), format!("{{{}", "b".repeat(8))]);
    }

    #[test]
    fn ucs2_split_and_surrogates() {
        let s = segment(&"я".repeat(100));
        assert_eq!(s.encoding, Encoding::Ucs2);
        assert_eq!(s.parts.iter().map(|p| p.chars().count()).collect::<Vec<_>>(), [67, 33]);
        // 66 units then an emoji (2 units): it goes whole into the next part.
        let text = format!("{}🙂🙂", "я".repeat(66));
        let s = segment(&text);
        assert_eq!(s.units, 70);
        assert_eq!(s.count(), 1, "70 units fit one part");
        let text = format!("{}🙂🙂z", "я".repeat(66));
        let s = segment(&text);
        assert_eq!(s.parts, vec!["я".repeat(66), "🙂🙂z".to_owned()]);
        for p in &s.parts {
            assert!(length_in(p, Encoding::Ucs2) <= 67);
        }
        // Nothing is lost or reordered.
        assert_eq!(s.parts.concat(), text);
    }

    #[test]
    fn kannel_coding_values() {
        assert_eq!(Encoding::Gsm7.kannel_coding(), 0);
        assert_eq!(Encoding::Ucs2.kannel_coding(), 2);
    }

    #[test]
    fn gsm7_octets() {
        assert_eq!(gsm7_encode("@A a"), Some(vec![0x00, 0x41, 0x20, 0x61]));
        assert_eq!(gsm7_encode("£Δ_ÆÉ"), Some(vec![0x01, 0x10, 0x11, 0x1C, 0x1F]));
        assert_eq!(gsm7_encode("{€}"), Some(vec![0x1B, 0x28, 0x1B, 0x65, 0x1B, 0x29]));
        assert_eq!(gsm7_encode("ï"), None);
        assert_eq!(gsm7_encode("à"), Some(vec![0x7F]));
        // Every GSM character survives the round trip.
        let all: String = BASIC.chars().chain(EXTENSION.chars()).collect();
        let octets = gsm7_encode(&all).unwrap();
        assert_eq!(octets.len(), length_in(&all, Encoding::Gsm7));
        assert_eq!(gsm7_decode(&octets), all);
        // Odd input: a trailing escape, an unknown extension code, high bits.
        assert_eq!(gsm7_decode(&[0x41, 0x1B]), "A");
        assert_eq!(gsm7_decode(&[0x1B, 0x41]), "A");
        assert_eq!(gsm7_decode(&[0xC1]), "A");
    }

    #[test]
    fn ucs2_octets() {
        assert_eq!(ucs2_encode("я🙂"), vec![0x04, 0x4F, 0xD8, 0x3D, 0xDE, 0x42]);
        assert_eq!(ucs2_decode(&ucs2_encode("Привет 🙂")), "Привет 🙂");
        assert_eq!(ucs2_decode(&[0x00, 0x41, 0x00]), "A");
    }
}
