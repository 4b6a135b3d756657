//! Splitting text to a byte or character budget on line, word and UTF-8 boundaries.

use unicode_segmentation::UnicodeSegmentation;

/// Limits of one chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    /// Most UTF-8 bytes.
    pub max_bytes: Option<usize>,
    /// Most characters (Unicode scalar values).
    pub max_chars: Option<usize>,
}

impl Budget {
    /// A byte budget.
    pub fn bytes(n: usize) -> Self {
        Self { max_bytes: Some(n), max_chars: None }
    }

    /// A character budget.
    pub fn chars(n: usize) -> Self {
        Self { max_bytes: None, max_chars: Some(n) }
    }

    fn fits(&self, bytes: usize, chars: usize) -> bool {
        self.max_bytes.is_none_or(|m| bytes <= m) && self.max_chars.is_none_or(|m| chars <= m)
    }
}

/// Splits `text` into chunks within `budget`: newlines first, then between words; a word that
/// alone is too long is cut between grapheme clusters (and, for a cluster longer than the
/// budget, between characters). No chunk is empty, characters are never split, and nothing is
/// lost except the whitespace at a split point. A budget of zero is treated as one.
pub fn split_text(text: &str, budget: Budget) -> Vec<String> {
    let budget = Budget {
        max_bytes: budget.max_bytes.map(|m| m.max(4)),
        max_chars: budget.max_chars.map(|m| m.max(1)),
    };
    let mut out = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        split_line(line, budget, &mut out);
    }
    out
}

fn split_line(line: &str, budget: Budget, out: &mut Vec<String>) {
    let mut cur = String::new();
    let mut cur_chars = 0;
    // Words with the whitespace that precedes them.
    for word in line.split_word_bounds() {
        let wc = word.chars().count();
        let sep_only = word.trim().is_empty();
        if budget.fits(cur.len() + word.len(), cur_chars + wc) {
            if !(cur.is_empty() && sep_only) {
                cur.push_str(word);
                cur_chars += wc;
            }
            continue;
        }
        // Does not fit: close the current chunk (trailing whitespace dropped).
        let trimmed = cur.trim_end().to_owned();
        if !trimmed.is_empty() {
            out.push(trimmed);
        }
        cur.clear();
        cur_chars = 0;
        if sep_only {
            continue;
        }
        if budget.fits(word.len(), wc) {
            cur.push_str(word);
            cur_chars = wc;
            continue;
        }
        // A single word longer than the budget: cut between graphemes, then chars.
        for g in word.graphemes(true) {
            let gc = g.chars().count();
            if budget.fits(cur.len() + g.len(), cur_chars + gc) {
                cur.push_str(g);
                cur_chars += gc;
                continue;
            }
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
                cur_chars = 0;
            }
            if budget.fits(g.len(), gc) {
                cur.push_str(g);
                cur_chars = gc;
            } else {
                for c in g.chars() {
                    if !budget.fits(cur.len() + c.len_utf8(), cur_chars + 1) && !cur.is_empty() {
                        out.push(std::mem::take(&mut cur));
                        cur_chars = 0;
                    }
                    cur.push(c);
                    cur_chars += 1;
                }
            }
        }
    }
    let trimmed = cur.trim_end();
    if !trimmed.is_empty() {
        out.push(trimmed.to_owned());
    }
}

/// The longest prefix of `s` of at most `n` bytes that ends on a character boundary.
pub fn truncate_to_bytes(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, budget: Budget) -> Vec<String> {
        let parts = split_text(text, budget);
        for p in &parts {
            assert!(!p.is_empty());
            if let Some(m) = budget.max_bytes {
                assert!(p.len() <= m.max(4), "{p:?} over {m} bytes");
            }
            if let Some(m) = budget.max_chars {
                assert!(p.chars().count() <= m.max(1), "{p:?} over {m} chars");
            }
        }
        // Nothing but whitespace is lost.
        let orig: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let joined: String = parts.concat().chars().filter(|c| !c.is_whitespace()).collect();
        assert_eq!(orig, joined);
        parts
    }

    #[test]
    fn words_lines_and_long_words() {
        assert_eq!(check("hello world foo", Budget::bytes(11)), ["hello world", "foo"]);
        assert_eq!(check("a\nb\n\nc", Budget::bytes(100)), ["a", "b", "c"]);
        assert_eq!(check("abcdefghij", Budget::chars(4)), ["abcd", "efgh", "ij"]);
        check("日本語のテキストです。とても長い文章を分割します。", Budget::bytes(10));
        check("👍🏽👍🏽👍🏽 🇫🇷🇫🇷", Budget::bytes(9));
        check(&"word ".repeat(500), Budget::bytes(400));
        check("x", Budget::bytes(0));
        check("  leading and trailing  ", Budget::chars(5));
        // A flag (two regional indicators) stays whole when it fits.
        let flags = check("🇫🇷🇩🇪", Budget::bytes(8));
        assert_eq!(flags, ["🇫🇷", "🇩🇪"]);
    }

    #[test]
    fn truncation() {
        assert_eq!(truncate_to_bytes("héllo", 2), "h");
        assert_eq!(truncate_to_bytes("héllo", 3), "hé");
        assert_eq!(truncate_to_bytes("abc", 10), "abc");
    }
}
