//! ISUPPORT (005) and case mapping.

/// How the server compares nicks and channel names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaseMapping {
    /// `A-Z` ↔ `a-z` only.
    Ascii,
    /// Also `[]\~` ↔ `{}|^`.
    #[default]
    Rfc1459,
    /// Also `[]\` ↔ `{}|`.
    StrictRfc1459,
}

impl CaseMapping {
    /// The folded (lowercase) form.
    pub fn fold(self, s: &str) -> String {
        s.chars()
            .map(|c| match (self, c) {
                (_, 'A'..='Z') => c.to_ascii_lowercase(),
                (Self::Rfc1459 | Self::StrictRfc1459, '[') => '{',
                (Self::Rfc1459 | Self::StrictRfc1459, ']') => '}',
                (Self::Rfc1459 | Self::StrictRfc1459, '\\') => '|',
                (Self::Rfc1459, '~') => '^',
                _ => c,
            })
            .collect()
    }

    /// Whether two names are the same.
    pub fn eq(self, a: &str, b: &str) -> bool {
        self.fold(a) == self.fold(b)
    }
}

/// What the server told us in 005.
#[derive(Debug, Clone)]
pub struct Isupport {
    /// `CASEMAPPING`.
    pub casemapping: CaseMapping,
    /// `PREFIX`: (mode, symbol) pairs, highest first.
    pub prefix: Vec<(char, char)>,
    /// `CHANTYPES`.
    pub chantypes: String,
    /// `NICKLEN`.
    pub nicklen: Option<usize>,
    /// `LINELEN`.
    pub linelen: Option<usize>,
    /// `NETWORK`.
    pub network: Option<String>,
}

impl Default for Isupport {
    fn default() -> Self {
        Self {
            casemapping: CaseMapping::Rfc1459,
            prefix: vec![('o', '@'), ('v', '+')],
            chantypes: "#&".to_owned(),
            nicklen: None,
            linelen: None,
            network: None,
        }
    }
}

impl Isupport {
    /// Applies the tokens of one 005 line (the nick and the trailing text are ignored).
    pub fn apply(&mut self, tokens: &[String]) {
        for t in tokens {
            let (k, v) = t.split_once('=').unwrap_or((t.as_str(), ""));
            match k {
                "CASEMAPPING" => {
                    self.casemapping = match v {
                        "ascii" => CaseMapping::Ascii,
                        "strict-rfc1459" => CaseMapping::StrictRfc1459,
                        _ => CaseMapping::Rfc1459,
                    }
                }
                "PREFIX" => {
                    if let Some((modes, symbols)) =
                        v.strip_prefix('(').and_then(|r| r.split_once(')'))
                    {
                        self.prefix = modes.chars().zip(symbols.chars()).collect();
                    }
                }
                "CHANTYPES" => self.chantypes = v.to_owned(),
                "NICKLEN" => self.nicklen = v.parse().ok(),
                "LINELEN" => self.linelen = v.parse().ok().filter(|n| *n >= 512),
                "NETWORK" => self.network = Some(v.to_owned()),
                _ => {}
            }
        }
    }

    /// Whether `name` is a channel.
    pub fn is_channel(&self, name: &str) -> bool {
        name.starts_with(|c: char| self.chantypes.contains(c))
    }

    /// Splits a NAMES entry (`@+nick`) into its modes and the nick.
    pub fn split_prefixes<'a>(&self, entry: &'a str) -> (Vec<char>, &'a str) {
        let mut modes = Vec::new();
        let mut rest = entry;
        while let Some(c) = rest.chars().next() {
            match self.prefix.iter().find(|(_, s)| *s == c) {
                Some((m, _)) => {
                    modes.push(*m);
                    rest = &rest[c.len_utf8()..];
                }
                None => break,
            }
        }
        (modes, rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn casemapping_and_tokens() {
        assert!(CaseMapping::Rfc1459.eq("Nick[a]", "nick{A}"));
        assert!(CaseMapping::Rfc1459.eq("a~", "A^"));
        assert!(!CaseMapping::StrictRfc1459.eq("a~", "a^"));
        assert!(!CaseMapping::Ascii.eq("[", "{"));
        let mut i = Isupport::default();
        let toks: Vec<String> = [
            "CASEMAPPING=ascii",
            "PREFIX=(qaohv)~&@%+",
            "CHANTYPES=#&+",
            "NICKLEN=30",
            "LINELEN=1024",
            "NETWORK=Test",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        i.apply(&toks);
        assert_eq!(i.casemapping, CaseMapping::Ascii);
        assert_eq!(i.nicklen, Some(30));
        assert_eq!(i.linelen, Some(1024));
        assert!(i.is_channel("+chan") && !i.is_channel("nick"));
        assert_eq!(i.split_prefixes("@+alice"), (vec!['o', 'v'], "alice"));
        assert_eq!(i.split_prefixes("bob"), (vec![], "bob"));
    }
}
