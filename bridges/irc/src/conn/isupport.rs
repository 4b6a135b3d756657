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
    /// `CHANMODES`: list modes (always a parameter), modes with a parameter, modes with a
    /// parameter when set, modes without one.
    pub chanmodes: [String; 4],
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
            chanmodes: ["beI".to_owned(), "k".to_owned(), "l".to_owned(), "imnpst".to_owned()],
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
                "CHANMODES" => {
                    let mut parts = v.split(',');
                    for slot in &mut self.chanmodes {
                        *slot = parts.next().unwrap_or_default().to_owned();
                    }
                }
                _ => {}
            }
        }
    }

    /// Whether `name` is a channel.
    pub fn is_channel(&self, name: &str) -> bool {
        name.starts_with(|c: char| self.chantypes.contains(c))
    }

    /// The changes in a channel `MODE` line (`+o-v`, then its arguments): (set?, mode, argument).
    /// Which modes take an argument comes from PREFIX and CHANMODES; a missing argument ends
    /// the list.
    pub fn mode_changes(&self, modes: &str, args: &[String]) -> Vec<(bool, char, Option<String>)> {
        let mut out = Vec::new();
        let mut args = args.iter();
        let mut set = true;
        for c in modes.chars() {
            match c {
                '+' => set = true,
                '-' => set = false,
                _ => {
                    let takes_arg = self.prefix.iter().any(|(m, _)| *m == c)
                        || self.chanmodes[0].contains(c)
                        || self.chanmodes[1].contains(c)
                        || (set && self.chanmodes[2].contains(c));
                    let arg = if takes_arg {
                        match args.next() {
                            Some(a) => Some(a.clone()),
                            None => break,
                        }
                    } else {
                        None
                    };
                    out.push((set, c, arg));
                }
            }
        }
        out
    }

    /// Whether `mode` is a member prefix mode (`o`, `v`, …).
    pub fn is_prefix_mode(&self, mode: char) -> bool {
        self.prefix.iter().any(|(m, _)| *m == mode)
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
    fn mode_lines() {
        let mut i = Isupport::default();
        i.apply(&["PREFIX=(qaohv)~&@%+".to_owned(), "CHANMODES=beI,k,l,imMnOPQRstVz".to_owned()]);
        let args: Vec<String> =
            ["alice", "*!*@bad", "secret", "10", "bob"].map(String::from).to_vec();
        assert_eq!(
            i.mode_changes("+ob-k+lmv", &args),
            vec![
                (true, 'o', Some("alice".to_owned())),
                (true, 'b', Some("*!*@bad".to_owned())),
                (false, 'k', Some("secret".to_owned())),
                (true, 'l', Some("10".to_owned())),
                (true, 'm', None),
                (true, 'v', Some("bob".to_owned())),
            ]
        );
        // -l takes no argument; a missing argument stops the list.
        assert_eq!(i.mode_changes("-l+o", &[]), vec![(false, 'l', None)]);
        assert!(i.is_prefix_mode('h') && !i.is_prefix_mode('b'));
    }

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
