//! IRC lines: parsing with `irc-proto` (tags, source), and strict serialisation that never lets
//! CR, LF or NUL reach the socket.

use std::str::FromStr;

use irc_proto::{Message, Prefix};

/// Why a line cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// A parameter holds CR, LF or NUL.
    #[error("parameter {0} contains CR, LF or NUL")]
    ForbiddenChar(usize),
    /// A middle parameter is empty, has a space or starts with `:`.
    #[error("parameter {0} cannot be a middle parameter")]
    BadMiddle(usize),
    /// The command is not letters or a three-digit numeric.
    #[error("invalid command {0:?}")]
    BadCommand(String),
    /// The serialised line is longer than 512 bytes.
    #[error("line too long ({0} bytes)")]
    TooLong(usize),
    /// A tag name is not `[+][vendor/]name` of letters, digits, `-` and `.`, or a value holds
    /// NUL.
    #[error("invalid message tag {0:?}")]
    BadTag(String),
    /// The serialised tags are longer than the 4094 bytes a client may send.
    #[error("message tags too long ({0} bytes)")]
    TagsTooLong(usize),
}

/// The most a client may send of `@tags ` (message-tags: 4094 bytes, the `@` and the space
/// included).
pub const CLIENT_TAGS_MAX: usize = 4094;

/// Where a message came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A server.
    Server(String),
    /// A user.
    User {
        /// Nick.
        nick: String,
        /// User name (may be empty).
        user: String,
        /// Host (may be empty).
        host: String,
    },
}

/// A parsed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrcLine {
    /// Message tags (values unescaped).
    pub tags: Vec<(String, Option<String>)>,
    /// The source, if any.
    pub source: Option<Source>,
    /// The command, uppercased, or a three-digit numeric.
    pub command: String,
    /// The parameters (the trailing one included, without its `:`).
    pub params: Vec<String>,
}

impl IrcLine {
    /// A line to send.
    pub fn new(command: &str, params: &[&str]) -> Self {
        Self {
            tags: Vec::new(),
            source: None,
            command: command.to_owned(),
            params: params.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    /// Parses one received line (without CRLF). Lines that are not UTF-8 should be decoded
    /// lossily first.
    pub fn parse(raw: &str) -> Option<Self> {
        let raw = raw.trim_end_matches(['\r', '\n']);
        // irc-proto parses tags (with unescaping) and the prefix; the command and its
        // parameters are split here so that every command, known to the crate or not, is kept
        // with its exact parameters.
        let msg = Message::from_str(raw).ok()?;
        let tags = msg.tags.unwrap_or_default().into_iter().map(|t| (t.0, t.1)).collect();
        let source = msg.prefix.map(|p| match p {
            Prefix::ServerName(s) => Source::Server(s),
            Prefix::Nickname(nick, user, host) => Source::User { nick, user, host },
        });
        let mut rest = raw;
        if rest.starts_with('@') {
            rest = rest.split_once(' ')?.1.trim_start();
        }
        if rest.starts_with(':') {
            rest = rest.split_once(' ')?.1.trim_start();
        }
        let (command, mut rest) = match rest.split_once(' ') {
            Some((c, r)) => (c, r),
            None => (rest, ""),
        };
        let mut params = Vec::new();
        loop {
            rest = rest.trim_start_matches(' ');
            if rest.is_empty() {
                break;
            }
            if let Some(trailing) = rest.strip_prefix(':') {
                params.push(trailing.to_owned());
                break;
            }
            match rest.split_once(' ') {
                Some((p, r)) => {
                    params.push(p.to_owned());
                    rest = r;
                }
                None => {
                    params.push(rest.to_owned());
                    break;
                }
            }
        }
        Some(Self { tags, source, command: command.to_ascii_uppercase(), params })
    }

    /// The source nick, if a user sent it.
    pub fn nick(&self) -> Option<&str> {
        match &self.source {
            Some(Source::User { nick, .. }) => Some(nick),
            _ => None,
        }
    }

    /// A tag's value.
    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref())
    }

    /// Parameter `i`, or "".
    pub fn param(&self, i: usize) -> &str {
        self.params.get(i).map(String::as_str).unwrap_or("")
    }

    /// The same line with a tag added.
    pub fn with_tag(mut self, name: &str, value: Option<&str>) -> Self {
        self.tags.push((name.to_owned(), value.map(str::to_owned)));
        self
    }

    /// Serialises for sending (tags escaped, no source), refusing anything that could inject:
    /// a tag value cannot end the tags or the line (`;`, space, CR and LF are escaped), and a
    /// tag name outside the grammar is an error.
    pub fn to_wire(&self) -> Result<String, LineError> {
        let tags = self.tags_to_wire()?;
        let body = self.body_to_wire()?;
        Ok(tags + &body)
    }

    /// `@a=b;c ` or "" without tags.
    fn tags_to_wire(&self) -> Result<String, LineError> {
        if self.tags.is_empty() {
            return Ok(String::new());
        }
        let mut out = String::from("@");
        for (i, (name, value)) in self.tags.iter().enumerate() {
            if !valid_tag_name(name) {
                return Err(LineError::BadTag(name.clone()));
            }
            if i > 0 {
                out.push(';');
            }
            out.push_str(name);
            if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
                if v.contains('\0') {
                    return Err(LineError::BadTag(name.clone()));
                }
                out.push('=');
                out.push_str(&escape_tag_value(v));
            }
        }
        out.push(' ');
        if out.len() > CLIENT_TAGS_MAX {
            return Err(LineError::TagsTooLong(out.len()));
        }
        Ok(out)
    }

    /// The line without its tags, with CRLF.
    fn body_to_wire(&self) -> Result<String, LineError> {
        let cmd_ok = (!self.command.is_empty()
            && self.command.bytes().all(|b| b.is_ascii_alphabetic()))
            || (self.command.len() == 3 && self.command.bytes().all(|b| b.is_ascii_digit()));
        if !cmd_ok {
            return Err(LineError::BadCommand(self.command.clone()));
        }
        let mut out = self.command.clone();
        let last = self.params.len().saturating_sub(1);
        for (i, p) in self.params.iter().enumerate() {
            if p.contains(['\r', '\n', '\0']) {
                return Err(LineError::ForbiddenChar(i));
            }
            out.push(' ');
            if i == last && (p.is_empty() || p.contains(' ') || p.starts_with(':')) {
                out.push(':');
            } else if p.is_empty() || p.contains(' ') || p.starts_with(':') {
                return Err(LineError::BadMiddle(i));
            }
            out.push_str(p);
        }
        if out.len() > 510 {
            return Err(LineError::TooLong(out.len()));
        }
        out.push_str("\r\n");
        Ok(out)
    }
}

/// Whether `name` is a tag name: `[+][vendor/]key`, the key of letters, digits and `-`, the
/// vendor a host name.
fn valid_tag_name(name: &str) -> bool {
    let name = name.strip_prefix('+').unwrap_or(name);
    let (vendor, key) = match name.rsplit_once('/') {
        Some((v, k)) => (Some(v), k),
        None => (None, name),
    };
    let key_ok = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let vendor_ok = vendor.is_none_or(|v| {
        !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    });
    key_ok && vendor_ok
}

/// Escapes a tag value (message-tags): `;` → `\:`, space → `\s`, `\` → `\\`, CR → `\r`,
/// LF → `\n`.
pub fn escape_tag_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            ';' => out.push_str("\\:"),
            ' ' => out.push_str("\\s"),
            '\\' => out.push_str("\\\\"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Replaces CR, LF and NUL in text that must stay on one line (topics, reasons, nicks).
pub fn one_line(s: &str) -> String {
    s.chars().map(|c| if matches!(c, '\r' | '\n' | '\0') { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tags_source_params() {
        let l = IrcLine::parse("@time=2026-01-01T00:00:00.000Z;msgid=a\\sb :nick!user@host PRIVMSG #chan :hello  world").unwrap();
        assert_eq!(l.tag("time"), Some("2026-01-01T00:00:00.000Z"));
        assert_eq!(l.tag("msgid"), Some("a b"));
        assert_eq!(l.nick(), Some("nick"));
        assert_eq!(l.command, "PRIVMSG");
        assert_eq!(l.params, ["#chan", "hello  world"]);
        let n =
            IrcLine::parse(":irc.x 005 me CASEMAPPING=ascii PREFIX=(ov)@+ :are supported").unwrap();
        assert_eq!(n.command, "005");
        assert_eq!(n.source, Some(Source::Server("irc.x".into())));
        assert_eq!(n.params, ["me", "CASEMAPPING=ascii", "PREFIX=(ov)@+", "are supported"]);
        let p = IrcLine::parse("PING :abc").unwrap();
        assert_eq!((p.command.as_str(), p.param(0)), ("PING", "abc"));
        let c = IrcLine::parse(":s CAP * LS * :sasl server-time").unwrap();
        assert_eq!(c.params, ["*", "LS", "*", "sasl server-time"]);
        assert!(IrcLine::parse("").is_none());
    }

    #[test]
    fn serialisation_refuses_injection() {
        assert_eq!(
            IrcLine::new("PRIVMSG", &["#c", "hi there"]).to_wire().unwrap(),
            "PRIVMSG #c :hi there\r\n"
        );
        assert_eq!(IrcLine::new("PRIVMSG", &["#c", ":)"]).to_wire().unwrap(), "PRIVMSG #c ::)\r\n");
        assert_eq!(
            IrcLine::new("PRIVMSG", &["#c", "x\r\nQUIT :pwned"]).to_wire(),
            Err(LineError::ForbiddenChar(1))
        );
        assert_eq!(
            IrcLine::new("PRIVMSG", &["#c\n", "x"]).to_wire(),
            Err(LineError::ForbiddenChar(0))
        );
        assert_eq!(
            IrcLine::new("PRIVMSG", &["#c", "a\0b"]).to_wire(),
            Err(LineError::ForbiddenChar(1))
        );
        assert_eq!(IrcLine::new("JOIN", &["#a b", "k"]).to_wire(), Err(LineError::BadMiddle(0)));
        assert!(IrcLine::new("PRIV MSG", &[]).to_wire().is_err());
        assert!(IrcLine::new("PRIVMSG", &["#c", &"x".repeat(600)]).to_wire().is_err());
        assert_eq!(one_line("a\r\nb\0"), "a  b ");
    }

    #[test]
    fn tags_are_escaped_and_checked() {
        let l = IrcLine::new("TAGMSG", &["#c"])
            .with_tag("+draft/react", Some("a; b\\c\r\nQUIT :x"))
            .with_tag("+draft/reply", Some("id1"));
        let wire = l.to_wire().unwrap();
        assert_eq!(
            wire,
            "@+draft/react=a\\:\\sb\\\\c\\r\\nQUIT\\s:x;+draft/reply=id1 TAGMSG #c\r\n"
        );
        // What we send parses back to the same tags.
        let back = IrcLine::parse(&wire).unwrap();
        assert_eq!(back.tag("+draft/react"), Some("a; b\\c\r\nQUIT :x"));
        assert_eq!(back.tag("+draft/reply"), Some("id1"));
        assert_eq!(back.params, ["#c"]);
        for bad in ["", "+", "a b", "a;b", "a=b", "x/", "/x", "a\r\n"] {
            let l = IrcLine::new("TAGMSG", &["#c"]).with_tag(bad, Some("v"));
            assert_eq!(l.to_wire(), Err(LineError::BadTag(bad.to_owned())), "{bad:?}");
        }
        let nul = IrcLine::new("TAGMSG", &["#c"]).with_tag("+x", Some("a\0b"));
        assert!(matches!(nul.to_wire(), Err(LineError::BadTag(_))));
        let long = IrcLine::new("TAGMSG", &["#c"]).with_tag("+x", Some(&"y".repeat(5000)));
        assert!(matches!(long.to_wire(), Err(LineError::TagsTooLong(_))));
        // Tags do not count towards the 512 bytes of the rest of the line.
        let text = "z".repeat(490);
        let l = IrcLine::new("PRIVMSG", &["#c", &text]).with_tag("+draft/reply", Some("m"));
        assert!(l.to_wire().is_ok());
    }
}
