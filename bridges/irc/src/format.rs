//! IRC formatting codes ↔ the framework's rich-text runs (and so Matrix HTML).
//!
//! Codes: `\x02` bold, `\x1D` italic, `\x1F` underline, `\x1E` strikethrough, `\x11` monospace,
//! `\x03` colour (`fg[,bg]`, 0–98), `\x04` hex colour (`RRGGBB[,RRGGBB]`), `\x16` reverse,
//! `\x0F` reset.

use trestle::util::format::{Color, Run, Style};

const BOLD: char = '\x02';
const ITALIC: char = '\x1D';
const UNDERLINE: char = '\x1F';
const STRIKE: char = '\x1E';
const MONO: char = '\x11';
const COLOR: char = '\x03';
const HEX: char = '\x04';
const REVERSE: char = '\x16';
const RESET: char = '\x0F';

/// The 16 standard mIRC colours and the extended 16–98 palette (ircdocs).
const PALETTE: [u32; 99] = [
    0xffffff, 0x000000, 0x00007f, 0x009300, 0xff0000, 0x7f0000, 0x9c009c, 0xfc7f00, 0xffff00,
    0x00fc00, 0x009393, 0x00ffff, 0x0000fc, 0xff00ff, 0x7f7f7f, 0xd2d2d2, 0x470000, 0x472100,
    0x474700, 0x324700, 0x004700, 0x00472c, 0x004747, 0x002747, 0x000047, 0x2e0047, 0x470047,
    0x47002a, 0x740000, 0x743a00, 0x747400, 0x517400, 0x007400, 0x007449, 0x007474, 0x004074,
    0x000074, 0x4b0074, 0x740074, 0x740045, 0xb50000, 0xb56300, 0xb5b500, 0x7db500, 0x00b500,
    0x00b571, 0x00b5b5, 0x0063b5, 0x0000b5, 0x7500b5, 0xb500b5, 0xb5006b, 0xff0000, 0xff8c00,
    0xffff00, 0xb2ff00, 0x00ff00, 0x00ffa0, 0x00ffff, 0x008cff, 0x0000ff, 0xa500ff, 0xff00ff,
    0xff0098, 0xff5959, 0xffb459, 0xffff71, 0xcfff60, 0x6fff6f, 0x65ffc9, 0x6dffff, 0x59b4ff,
    0x5959ff, 0xc459ff, 0xff66ff, 0xff59bc, 0xff9c9c, 0xffd39c, 0xffff9c, 0xe2ff9c, 0x9cff9c,
    0x9cffdb, 0x9cffff, 0x9cd3ff, 0x9c9cff, 0xdc9cff, 0xff9cff, 0xff94d3, 0x000000, 0x131313,
    0x282828, 0x363636, 0x4d4d4d, 0x656565, 0x818181, 0x9f9f9f, 0xbcbcbc, 0xe2e2e2, 0xffffff,
];

fn rgb(v: u32) -> Color {
    Color { r: (v >> 16) as u8, g: (v >> 8) as u8, b: v as u8 }
}

/// The palette index closest to a colour (for Matrix → IRC).
fn nearest(c: Color) -> u8 {
    let dist = |v: u32| {
        let o = rgb(v);
        let d = |a: u8, b: u8| (i32::from(a) - i32::from(b)).pow(2);
        d(o.r, c.r) + d(o.g, c.g) + d(o.b, c.b)
    };
    // Prefer the 16 standard colours; every client renders those.
    (0..16u8).min_by_key(|&i| dist(PALETTE[usize::from(i)])).unwrap_or(1)
}

fn take_digits(chars: &[char], i: &mut usize, max: usize) -> Option<u8> {
    let start = *i;
    while *i < chars.len() && *i - start < max && chars[*i].is_ascii_digit() {
        *i += 1;
    }
    (start != *i).then(|| chars[start..*i].iter().collect::<String>().parse().ok()).flatten()
}

fn take_hex(chars: &[char], i: &mut usize) -> Option<Color> {
    if *i + 6 <= chars.len() && chars[*i..*i + 6].iter().all(char::is_ascii_hexdigit) {
        let s: String = chars[*i..*i + 6].iter().collect();
        *i += 6;
        u32::from_str_radix(&s, 16).ok().map(rgb)
    } else {
        None
    }
}

/// Parses IRC text into runs. Unknown control characters are dropped.
pub fn irc_to_runs(text: &str) -> Vec<Run> {
    let chars: Vec<char> = text.chars().collect();
    let mut runs: Vec<Run> = Vec::new();
    let mut style = Style::default();
    let mut buf = String::new();
    let mut reversed = false;
    let flush = |buf: &mut String, style: &Style, runs: &mut Vec<Run>| {
        if !buf.is_empty() {
            runs.push(Run { text: std::mem::take(buf), style: style.clone() });
        }
    };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            BOLD | ITALIC | UNDERLINE | STRIKE | MONO | RESET | REVERSE | COLOR | HEX => {
                flush(&mut buf, &style, &mut runs);
                match c {
                    BOLD => style.bold = !style.bold,
                    ITALIC => style.italic = !style.italic,
                    UNDERLINE => style.underline = !style.underline,
                    STRIKE => style.strikethrough = !style.strikethrough,
                    MONO => style.code = !style.code,
                    RESET => {
                        style = Style::default();
                        reversed = false;
                    }
                    REVERSE => {
                        reversed = !reversed;
                        std::mem::swap(&mut style.fg, &mut style.bg);
                    }
                    COLOR => match take_digits(&chars, &mut i, 2) {
                        Some(fg) => {
                            style.fg = PALETTE.get(usize::from(fg)).copied().map(rgb);
                            if i + 1 < chars.len()
                                && chars[i] == ','
                                && chars[i + 1].is_ascii_digit()
                            {
                                i += 1;
                                if let Some(bg) = take_digits(&chars, &mut i, 2) {
                                    style.bg = PALETTE.get(usize::from(bg)).copied().map(rgb);
                                }
                            }
                        }
                        None => {
                            style.fg = None;
                            style.bg = None;
                        }
                    },
                    _ => match take_hex(&chars, &mut i) {
                        Some(fg) => {
                            style.fg = Some(fg);
                            if i < chars.len() && chars[i] == ',' {
                                let save = i;
                                i += 1;
                                match take_hex(&chars, &mut i) {
                                    Some(bg) => style.bg = Some(bg),
                                    None => i = save,
                                }
                            }
                        }
                        None => {
                            style.fg = None;
                            style.bg = None;
                        }
                    },
                }
            }
            c if c.is_control() && c != '\t' => {}
            c => buf.push(c),
        }
    }
    flush(&mut buf, &style, &mut runs);
    let _ = reversed;
    runs
}

/// Renders runs as IRC text. Links whose text differs from the URL become `text <url>`; newlines
/// are kept (the caller splits lines). No CR or NUL is ever produced.
pub fn runs_to_irc(runs: &[Run]) -> String {
    let mut out = String::new();
    let mut cur = Style::default();
    for run in runs {
        let s = &run.style;
        let mut toggles = String::new();
        if s.bold != cur.bold {
            toggles.push(BOLD);
        }
        if s.italic != cur.italic {
            toggles.push(ITALIC);
        }
        if s.underline != cur.underline {
            toggles.push(UNDERLINE);
        }
        if s.strikethrough != cur.strikethrough {
            toggles.push(STRIKE);
        }
        if s.code != cur.code {
            toggles.push(MONO);
        }
        let colour_changed = s.fg != cur.fg || s.bg != cur.bg;
        if colour_changed {
            match (s.fg, s.bg) {
                (None, None) => toggles.push(COLOR),
                (fg, bg) => {
                    let fg = fg.map_or(99, nearest);
                    toggles.push(COLOR);
                    toggles.push_str(&format!("{fg:02}"));
                    if let Some(bg) = bg {
                        toggles.push_str(&format!(",{:02}", nearest(bg)));
                    }
                }
            }
        }
        out.push_str(&toggles);
        let text: String = run.text.chars().filter(|c| *c != '\r' && *c != '\0').collect();
        // A digit right after a colour code would be read as part of it.
        if colour_changed && text.starts_with(|c: char| c.is_ascii_digit() || c == ',') {
            out.push_str("\x02\x02");
        }
        out.push_str(&text);
        if let Some(link) = &s.link
            && link != &run.text
            && !link.starts_with("https://matrix.to/")
        {
            out.push_str(&format!(" <{}>", link.replace(['\r', '\n', '\0'], "")));
        }
        cur = Style { link: None, ..s.clone() };
    }
    if cur != Style::default() {
        out.push(RESET);
    }
    out
}

/// Removes every formatting code (for nicks, topics shown as plain text, logs).
pub fn strip_codes(text: &str) -> String {
    irc_to_runs(text).into_iter().map(|r| r.text).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_styles_and_colours() {
        let runs = irc_to_runs("a\x02b\x02\x1Dc\x0F\x0304,12red\x03 \x04FF8800hex\x0F1");
        let texts: Vec<_> = runs.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, ["a", "b", "c", "red", " ", "hex", "1"]);
        assert!(runs[1].style.bold && !runs[2].style.bold && runs[2].style.italic);
        assert_eq!(runs[3].style.fg, Some(rgb(0xff0000)));
        assert_eq!(runs[3].style.bg, Some(rgb(0x0000fc)));
        assert_eq!(runs[4].style.fg, None);
        assert_eq!(runs[5].style.fg, Some(rgb(0xff8800)));
        assert_eq!(runs[6].style, Style::default());
    }

    #[test]
    fn colour_code_edge_cases() {
        // "\x031,2" then digits: at most two digits are taken.
        let runs = irc_to_runs("\x03123");
        assert_eq!(runs[0].text, "3");
        assert_eq!(runs[0].style.fg, Some(rgb(PALETTE[12])));
        // A comma not followed by a digit stays text.
        let runs = irc_to_runs("\x034,hi");
        assert_eq!(runs[0].text, ",hi");
        // Stray control characters never survive.
        assert_eq!(strip_codes("a\x01b\x07c\x00d"), "abcd");
    }

    #[test]
    fn round_trip() {
        let runs = vec![
            Run { text: "plain ".into(), style: Style::default() },
            Run { text: "bold".into(), style: Style { bold: true, ..Style::default() } },
            Run { text: "42".into(), style: Style { fg: Some(rgb(0xff0000)), ..Style::default() } },
            Run { text: " code".into(), style: Style { code: true, ..Style::default() } },
        ];
        let irc = runs_to_irc(&runs);
        assert_eq!(irc, "plain \x02bold\x02\x0304\x02\x0242\x11\x03 code\x0F");
        let back = irc_to_runs(&irc);
        let texts: String = back.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, "plain bold42 code");
        assert!(back.iter().any(|r| r.text == "42" && r.style.fg == Some(rgb(0xff0000))));
    }

    #[test]
    fn links_and_no_injection() {
        let runs = vec![Run {
            text: "site\r\0".into(),
            style: Style { link: Some("https://ex.org/\r\nQUIT".into()), ..Style::default() },
        }];
        let irc = runs_to_irc(&runs);
        assert!(!irc.contains('\r') && !irc.contains('\0'));
        assert_eq!(irc, "site <https://ex.org/QUIT>");
    }
}
