//! XEP-0393 message styling → Matrix HTML, for the `formatted_body` of messages from XMPP.
//!
//! XMPP clients style plain text in place: `*strong*`, `_emphasis_`, `~strike~`, `` `code` ``,
//! blocks fenced with ```` ``` ````, and `>` quotes. The body keeps the text as written; the HTML
//! renders what the sender saw. Everything is escaped first: nothing in the text becomes markup
//! except what the rules below produce.
//!
//! The rules followed (XEP-0393 §6): a span opens at the start of a line or after whitespace (or
//! another opening directive), is followed by a non-whitespace character, and closes at the first
//! matching directive preceded by a non-whitespace character on the same line; empty spans are
//! plain text; nothing is styled inside `` ` `` spans or fenced blocks. A fence closes at a line
//! that is exactly ```` ``` ```` or at the end of the enclosing quote or message.

use trestle::util::format::escape_html as escape;

/// The HTML for `text`, or `None` when it uses no styling (the body alone says it all).
pub fn to_html(text: &str) -> Option<String> {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut styled = false;
    let html = blocks(&lines, &mut styled);
    styled.then_some(html)
}

/// Renders lines as blocks: quotes, fenced preformatted blocks, and plain lines.
fn blocks(lines: &[&str], styled: &mut bool) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.starts_with('>') {
            // A quote: this line and the following quoted ones, one level stripped.
            let mut inner = Vec::new();
            while i < lines.len() && lines[i].starts_with('>') {
                let rest = &lines[i][1..];
                inner.push(rest.strip_prefix(' ').unwrap_or(rest));
                i += 1;
            }
            *styled = true;
            out.push(format!("<blockquote>{}</blockquote>", blocks(&inner, styled)));
            continue;
        }
        if line.starts_with("```") {
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && lines[i] != "```" {
                body.push(escape(lines[i]));
                i += 1;
            }
            i += 1; // the closing fence, if any
            *styled = true;
            out.push(format!("<pre><code>{}</code></pre>", body.join("\n")));
            continue;
        }
        out.push(spans(line, styled));
        i += 1;
    }
    // Lines of text are separated by <br>; blocks separate themselves.
    let mut html = String::new();
    for (n, part) in out.iter().enumerate() {
        let block = |s: &str| s.starts_with("<blockquote>") || s.starts_with("<pre>");
        if n > 0 && !block(part) && !block(&out[n - 1]) {
            html.push_str("<br>");
        }
        html.push_str(part);
    }
    html
}

/// The span directives and their HTML elements.
fn element(directive: char) -> Option<&'static str> {
    match directive {
        '*' => Some("strong"),
        '_' => Some("em"),
        '~' => Some("del"),
        '`' => Some("code"),
        _ => None,
    }
}

/// Renders one line's spans.
fn spans(line: &str, styled: &mut bool) -> String {
    let chars: Vec<char> = line.chars().collect();
    render(&chars, styled)
}

fn render(chars: &[char], styled: &mut bool) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let opens = element(c).is_some()
            && (i == 0 || chars[i - 1].is_whitespace() || element(chars[i - 1]).is_some())
            && chars.get(i + 1).is_some_and(|n| !n.is_whitespace());
        if opens && let Some(end) = closing(chars, i) {
            let tag = element(c).unwrap_or("span");
            let inner = &chars[i + 1..end];
            let content = if c == '`' {
                escape(&inner.iter().collect::<String>())
            } else {
                render(inner, styled)
            };
            *styled = true;
            out.push_str(&format!("<{tag}>{content}</{tag}>"));
            i = end + 1;
            continue;
        }
        out.push_str(&escape(&c.to_string()));
        i += 1;
    }
    out
}

/// The index of the directive closing the span opened at `open`, if any: the first same
/// directive after at least one character, preceded by non-whitespace.
fn closing(chars: &[char], open: usize) -> Option<usize> {
    let d = chars[open];
    (open + 2..chars.len()).find(|&j| chars[j] == d && !chars[j - 1].is_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_has_no_html() {
        assert_eq!(to_html("just words, 2 * 3 = 6 and snake_case_name"), None);
        assert_eq!(to_html("a * b * c"), None);
        assert_eq!(to_html("**"), None);
        assert_eq!(to_html("<b>not markup</b>"), None);
    }

    #[test]
    fn spans() {
        assert_eq!(
            to_html("*bold* and _it_").as_deref(),
            Some("<strong>bold</strong> and <em>it</em>")
        );
        assert_eq!(to_html("~gone~").as_deref(), Some("<del>gone</del>"));
        assert_eq!(to_html("*_both_*").as_deref(), Some("<strong><em>both</em></strong>"));
        // Nothing is styled inside code; the text is escaped.
        assert_eq!(to_html("`*a* <b>`").as_deref(), Some("<code>*a* &lt;b&gt;</code>"));
        // A closing directive must follow non-whitespace; spans stay on their line.
        assert_eq!(to_html("*not closed *"), None);
        assert_eq!(to_html("*one\nline*"), None);
        assert_eq!(to_html("x *y* <z>").as_deref(), Some("x <strong>y</strong> &lt;z&gt;"));
    }

    #[test]
    fn blocks() {
        assert_eq!(
            to_html("look:\n```\nfn main() {}\n  <x>\n```\ndone").as_deref(),
            Some("look:<pre><code>fn main() {}\n  &lt;x&gt;</code></pre>done")
        );
        assert_eq!(
            to_html("> quoted *text*\n> more\nanswer").as_deref(),
            Some("<blockquote>quoted <strong>text</strong><br>more</blockquote>answer")
        );
        // An unclosed fence runs to the end.
        assert_eq!(to_html("```\nopen").as_deref(), Some("<pre><code>open</code></pre>"));
        assert_eq!(to_html("a\nb"), None);
    }
}
