//! IRC nick rules: making a valid nick from a Matrix displayname, and collision alternatives.

/// Characters allowed anywhere in a nick besides ASCII letters (RFC 2812 "special").
const SPECIAL: &[char] = &['[', ']', '\\', '`', '_', '^', '{', '|', '}'];

fn allowed_first(c: char) -> bool {
    c.is_ascii_alphabetic() || SPECIAL.contains(&c)
}

fn allowed_rest(c: char) -> bool {
    allowed_first(c) || c.is_ascii_digit() || c == '-'
}

/// Whether `nick` is acceptable to a strict server.
pub fn is_valid(nick: &str, max_len: usize) -> bool {
    let mut chars = nick.chars();
    matches!(chars.next(), Some(c) if allowed_first(c))
        && chars.all(allowed_rest)
        && nick.len() <= max_len
}

/// A valid nick from free text: invalid characters dropped (spaces become `_`), a leading digit
/// or dash gets a `_` before it, the result is cut to `max_len` keeping a `suffix` such as `[m]`
/// intact. Empty input gives `fallback`.
pub fn sanitize(text: &str, suffix: &str, max_len: usize, fallback: &str) -> String {
    let suffix: String = suffix.chars().filter(|c| allowed_rest(*c)).collect();
    let mut base: String = text
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .filter(|c| allowed_rest(*c))
        .collect();
    if base.is_empty() {
        base = fallback.chars().filter(|c| allowed_rest(*c)).collect();
    }
    if !base.starts_with(allowed_first) {
        base.insert(0, '_');
    }
    let room = max_len.saturating_sub(suffix.len()).max(1);
    base.truncate(room);
    let nick = format!("{base}{suffix}");
    if nick.len() > max_len { nick[..max_len].to_owned() } else { nick }
}

/// The `n`-th alternative for a nick in use: `nick_`, `nick1`, `nick2`, … within `max_len`.
pub fn alternative(nick: &str, n: u32, max_len: usize) -> String {
    let tail = if n == 0 { "_".to_owned() } else { n.to_string() };
    let keep = max_len.saturating_sub(tail.len()).max(1).min(nick.len());
    format!("{}{tail}", &nick[..keep])
}

/// The nick for a Matrix user from the network's template (`{displayname}` or `{localpart}`).
pub fn from_template(
    template: &str,
    displayname: Option<&str>,
    user_id: &str,
    max_len: usize,
) -> String {
    let localpart = user_id.trim_start_matches('@').split(':').next().unwrap_or("matrix");
    let (var, value) = if template.contains("{displayname}") {
        ("{displayname}", displayname.filter(|d| !d.trim().is_empty()).unwrap_or(localpart))
    } else {
        ("{localpart}", localpart)
    };
    let (prefix, suffix) = template.split_once(var).unwrap_or(("", ""));
    sanitize(&format!("{prefix}{value}"), suffix, max_len, localpart)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitises_displaynames() {
        assert_eq!(
            from_template("{displayname}[m]", Some("Alice Smith"), "@alice:x", 30),
            "Alice_Smith[m]"
        );
        assert_eq!(from_template("{displayname}[m]", Some("🙂"), "@bob:x", 30), "bob[m]");
        assert_eq!(from_template("{displayname}[m]", Some("9lives"), "@c:x", 30), "_9lives[m]");
        assert_eq!(from_template("{localpart}|m", None, "@dave:x", 30), "dave|m");
        assert_eq!(
            from_template("{displayname}[m]", Some("a\r\nQUIT :x\0"), "@e:x", 30),
            "a__QUIT_x[m]"
        );
        let long = from_template("{displayname}[m]", Some("abcdefghijklmnopqrstuvwxyz"), "@f:x", 9);
        assert_eq!(long, "abcdef[m]");
        assert!(is_valid(&long, 9));
        for d in ["", " ", "-x", "日本語", "a b c", "[]`^"] {
            let n = from_template("{displayname}[m]", Some(d), "@g:x", 16);
            assert!(is_valid(&n, 16), "{d:?} -> {n:?}");
        }
    }

    #[test]
    fn alternatives_stay_within_limits() {
        assert_eq!(alternative("alice[m]", 0, 30), "alice[m]_");
        assert_eq!(alternative("alice[m]", 3, 30), "alice[m]3");
        assert_eq!(alternative("abcdefghi", 12, 9), "abcdefg12");
        assert!(is_valid(&alternative("abcdefghi", 12, 9), 9));
    }
}
