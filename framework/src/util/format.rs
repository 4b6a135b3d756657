//! A rich-text model shared by bridges: Matrix HTML ↔ styled runs ↔ plain text / markdown.
//!
//! Bridges convert their network's formatting (IRC control codes, XEP-0393 styling, …) to and
//! from [`Run`]s; this module converts runs to and from Matrix's `org.matrix.custom.html`.
//! Blocks are flattened: code blocks become `code` runs with newlines, list items `• ` / `1. `
//! lines, block quotes `> ` lines.

use pulldown_cmark::{Event, Options, Parser};
use scraper::{Html, Node};

/// An RGB colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Color {
    /// Red.
    pub r: u8,
    /// Green.
    pub g: u8,
    /// Blue.
    pub b: u8,
}

impl Color {
    /// Parses `#rrggbb` (or `rrggbb`).
    pub fn parse_hex(s: &str) -> Option<Self> {
        let h = s.trim().trim_start_matches('#');
        if h.len() != 6 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let v = u32::from_str_radix(h, 16).ok()?;
        Some(Self { r: (v >> 16) as u8, g: (v >> 8) as u8, b: v as u8 })
    }

    /// `#rrggbb`.
    pub fn to_hex(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.r, self.g, self.b)
    }
}

/// The style of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Style {
    /// Bold.
    pub bold: bool,
    /// Italic.
    pub italic: bool,
    /// Underlined.
    pub underline: bool,
    /// Struck through.
    pub strikethrough: bool,
    /// Monospace.
    pub code: bool,
    /// Text colour.
    pub fg: Option<Color>,
    /// Background colour.
    pub bg: Option<Color>,
    /// Link target.
    pub link: Option<String>,
}

/// Text with one style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The text (may contain `\n`).
    pub text: String,
    /// Its style.
    pub style: Style,
}

struct Walker {
    runs: Vec<Run>,
    quote: usize,
    at_line_start: bool,
}

impl Walker {
    fn push(&mut self, text: &str, style: &Style) {
        for (i, line) in text.split('\n').enumerate() {
            if i > 0 {
                // Newlines inside code keep the code style, so a block stays one run.
                let nl_style = if style.code { style.clone() } else { Style::default() };
                self.raw("\n", &nl_style);
                self.at_line_start = true;
            }
            if line.is_empty() {
                continue;
            }
            if self.at_line_start && self.quote > 0 {
                self.raw(&"> ".repeat(self.quote), &Style::default());
            }
            self.raw(line, style);
            self.at_line_start = false;
        }
    }

    fn raw(&mut self, text: &str, style: &Style) {
        match self.runs.last_mut() {
            Some(last) if last.style == *style => last.text.push_str(text),
            _ => self.runs.push(Run { text: text.to_owned(), style: style.clone() }),
        }
    }

    fn newline(&mut self) {
        if !self.at_line_start && !self.runs.is_empty() {
            self.push("\n", &Style::default());
        }
    }

    fn walk(
        &mut self,
        node: ego_tree::NodeRef<'_, Node>,
        style: &Style,
        pre: bool,
        list: &mut Vec<Option<u32>>,
    ) {
        match node.value() {
            Node::Text(t) => {
                if pre {
                    self.push(t, style);
                } else {
                    let mut collapsed = String::with_capacity(t.len());
                    let mut last_space = self.at_line_start;
                    for c in t.chars() {
                        if c.is_whitespace() {
                            if !last_space {
                                collapsed.push(' ');
                            }
                            last_space = true;
                        } else {
                            collapsed.push(c);
                            last_space = false;
                        }
                    }
                    if !collapsed.is_empty() {
                        self.push(&collapsed, style);
                    }
                }
            }
            Node::Element(e) => {
                let name = e.name();
                let mut s = style.clone();
                let mut pre = pre;
                match name {
                    "mx-reply" | "script" | "style" | "head" => return,
                    "br" => {
                        self.push("\n", &Style::default());
                        return;
                    }
                    "img" => {
                        let alt = e.attr("alt").or(e.attr("title")).unwrap_or("image");
                        self.push(&format!("[{alt}]"), style);
                        return;
                    }
                    "hr" => {
                        self.newline();
                        self.push("---\n", &Style::default());
                        return;
                    }
                    "b" | "strong" => s.bold = true,
                    "i" | "em" => s.italic = true,
                    "u" | "ins" => s.underline = true,
                    "s" | "del" | "strike" => s.strikethrough = true,
                    "code" => s.code = true,
                    "pre" => {
                        s.code = true;
                        pre = true;
                        self.newline();
                    }
                    "a" => s.link = e.attr("href").map(str::to_owned),
                    "font" | "span" => {
                        if let Some(c) =
                            e.attr("data-mx-color").or(e.attr("color")).and_then(Color::parse_hex)
                        {
                            s.fg = Some(c);
                        }
                        if let Some(c) = e.attr("data-mx-bg-color").and_then(Color::parse_hex) {
                            s.bg = Some(c);
                        }
                    }
                    "h1" | "h2" | "h3" | "h4" | "h5" | "h6" => {
                        self.newline();
                        s.bold = true;
                    }
                    "p" | "div" | "table" | "tr" => self.newline(),
                    "blockquote" => {
                        self.newline();
                        self.quote += 1;
                    }
                    "ul" => {
                        self.newline();
                        list.push(None);
                    }
                    "ol" => {
                        self.newline();
                        let start = e.attr("start").and_then(|v| v.parse().ok()).unwrap_or(1);
                        list.push(Some(start));
                    }
                    "li" => {
                        self.newline();
                        let indent = "  ".repeat(list.len().saturating_sub(1));
                        let marker = match list.last_mut() {
                            Some(Some(n)) => {
                                let m = format!("{indent}{n}. ");
                                *n += 1;
                                m
                            }
                            _ => format!("{indent}• "),
                        };
                        self.push(&marker, &Style::default());
                    }
                    _ => {}
                }
                for child in node.children() {
                    self.walk(child, &s, pre, list);
                }
                match name {
                    "blockquote" => {
                        self.newline();
                        self.quote = self.quote.saturating_sub(1);
                    }
                    "ul" | "ol" => {
                        list.pop();
                        self.newline();
                    }
                    "p" | "div" | "pre" | "li" | "tr" | "table" | "h1" | "h2" | "h3" | "h4"
                    | "h5" | "h6" => self.newline(),
                    "td" | "th" => self.push(" ", style),
                    _ => {}
                }
            }
            _ => {
                for child in node.children() {
                    self.walk(child, style, pre, list);
                }
            }
        }
    }
}

/// Parses Matrix HTML into runs. Tolerates any input; never panics.
pub fn html_to_runs(html: &str) -> Vec<Run> {
    let doc = Html::parse_fragment(html);
    let mut w = Walker { runs: Vec::new(), quote: 0, at_line_start: true };
    let mut list = Vec::new();
    for child in doc.root_element().children() {
        w.walk(child, &Style::default(), false, &mut list);
    }
    // Trim trailing newlines.
    while let Some(last) = w.runs.last_mut() {
        let trimmed = last.text.trim_end_matches('\n').len();
        if trimmed == 0 {
            w.runs.pop();
        } else {
            last.text.truncate(trimmed);
            break;
        }
    }
    w.runs
}

/// Escapes text for HTML.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Escaped text with newlines as `<br>`.
pub fn plain_to_html(text: &str) -> String {
    escape_html(text).replace('\n', "<br>")
}

/// Renders runs as Matrix HTML (everything escaped). Multi-line code becomes `<pre><code>`.
pub fn runs_to_html(runs: &[Run]) -> String {
    let mut out = String::new();
    for run in runs {
        let s = &run.style;
        let multiline_code = s.code && run.text.contains('\n');
        let mut open = String::new();
        let mut close = Vec::new();
        let mut tag = |o: String, c: &'static str| {
            open.push_str(&o);
            close.push(c);
        };
        if let Some(l) = &s.link {
            tag(format!("<a href=\"{}\">", escape_html(l)), "</a>");
        }
        if s.fg.is_some() || s.bg.is_some() {
            let mut attrs = String::new();
            if let Some(c) = s.fg {
                attrs.push_str(&format!(" data-mx-color=\"{}\"", c.to_hex()));
            }
            if let Some(c) = s.bg {
                attrs.push_str(&format!(" data-mx-bg-color=\"{}\"", c.to_hex()));
            }
            tag(format!("<span{attrs}>"), "</span>");
        }
        if s.bold {
            tag("<strong>".into(), "</strong>");
        }
        if s.italic {
            tag("<em>".into(), "</em>");
        }
        if s.underline {
            tag("<u>".into(), "</u>");
        }
        if s.strikethrough {
            tag("<del>".into(), "</del>");
        }
        if multiline_code {
            tag("<pre><code>".into(), "</code></pre>");
        } else if s.code {
            tag("<code>".into(), "</code>");
        }
        out.push_str(&open);
        if multiline_code {
            out.push_str(&escape_html(&run.text));
        } else {
            out.push_str(&plain_to_html(&run.text));
        }
        for c in close.iter().rev() {
            out.push_str(c);
        }
    }
    out
}

/// Readable plain text (markdown-ish) from runs: `**bold**`, `_italic_`, `` `code` ``,
/// ```` ``` ```` blocks, `~~struck~~`, links as `text (url)` when the text differs.
pub fn runs_to_plain(runs: &[Run]) -> String {
    let mut out = String::new();
    for run in runs {
        let s = &run.style;
        let mut t = run.text.clone();
        if s.code {
            t = if t.contains('\n') { format!("```\n{t}\n```") } else { format!("`{t}`") };
        } else {
            if s.bold {
                t = format!("**{t}**");
            }
            if s.italic {
                t = format!("_{t}_");
            }
            if s.strikethrough {
                t = format!("~~{t}~~");
            }
        }
        if let Some(l) = &s.link
            && l != &run.text
            && !l.starts_with("https://matrix.to/")
        {
            t = format!("{t} ({l})");
        }
        out.push_str(&t);
    }
    out
}

/// Plain text from Matrix HTML.
pub fn html_to_plain(html: &str) -> String {
    runs_to_plain(&html_to_runs(html))
}

/// Markdown to Matrix HTML; raw HTML in the input is escaped, not passed through.
pub fn markdown_to_html(md: &str) -> String {
    let mut opts = Options::empty();
    opts.insert(Options::ENABLE_STRIKETHROUGH);
    let events = Parser::new_ext(md, opts).map(|e| match e {
        Event::Html(h) | Event::InlineHtml(h) => Event::Text(h),
        Event::SoftBreak => Event::HardBreak,
        other => other,
    });
    let mut out = String::new();
    pulldown_cmark::html::push_html(&mut out, events);
    let out = out.trim_end();
    // A single paragraph needs no <p>.
    match out.strip_prefix("<p>").and_then(|s| s.strip_suffix("</p>")) {
        Some(inner) if !inner.contains("<p>") => inner.to_owned(),
        _ => out.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(runs: &[Run]) -> String {
        runs.iter().map(|r| r.text.as_str()).collect()
    }

    #[test]
    fn html_to_runs_styles() {
        let runs = html_to_runs(
            "a <b>bold <i>both</i></b> <a href=\"https://x.org\">link</a> <font color=\"#ff0000\">red</font>",
        );
        assert_eq!(texts(&runs), "a bold both link red");
        assert!(runs.iter().any(|r| r.text == "both" && r.style.bold && r.style.italic));
        assert!(
            runs.iter()
                .any(|r| r.text == "link" && r.style.link.as_deref() == Some("https://x.org"))
        );
        assert!(
            runs.iter()
                .any(|r| r.text == "red" && r.style.fg == Some(Color { r: 255, g: 0, b: 0 }))
        );
    }

    #[test]
    fn blocks_lists_quotes_code_reply() {
        let runs = html_to_runs(
            "<mx-reply><blockquote>old</blockquote></mx-reply><p>one</p><ul><li>x</li><li>y</li></ul><ol start=\"3\"><li>z</li></ol><blockquote>q1<br>q2</blockquote><pre><code>fn main() {\n    x\n}</code></pre>",
        );
        let t = texts(&runs);
        assert_eq!(t, "one\n• x\n• y\n3. z\n> q1\n> q2\nfn main() {\n    x\n}");
        assert!(runs.iter().any(|r| r.style.code && r.text.contains("    x")));
        assert!(!t.contains("old"));
    }

    #[test]
    fn hostile_html_never_panics_and_escapes() {
        for h in [
            "<b><i>unclosed",
            "</p></p><<>>",
            "<a href='javascript:x'>",
            "&amp;&lt;&#0;",
            "<script>alert(1)</script>ok",
            "<table><tr><td>a</td><td>b</td></tr></table>",
        ] {
            let runs = html_to_runs(h);
            let back = runs_to_html(&runs);
            assert!(!back.contains("<script"), "{back}");
        }
        assert_eq!(texts(&html_to_runs("<script>alert(1)</script>ok")), "ok");
        let runs = vec![Run {
            text: "</b><evil>&".into(),
            style: Style { bold: true, ..Style::default() },
        }];
        assert_eq!(runs_to_html(&runs), "<strong>&lt;/b&gt;&lt;evil&gt;&amp;</strong>");
    }

    #[test]
    fn round_trip_and_plain() {
        let html = "<strong>b</strong> <em>i</em> <code>c</code> <del>s</del> <a href=\"https://e.org\">site</a>";
        let runs = html_to_runs(html);
        assert_eq!(html_to_runs(&runs_to_html(&runs)), runs);
        assert_eq!(runs_to_plain(&runs), "**b** _i_ `c` ~~s~~ site (https://e.org)");
        assert_eq!(html_to_plain("<pre><code>a\nb</code></pre>"), "```\na\nb\n```");
    }

    #[test]
    fn markdown() {
        assert_eq!(markdown_to_html("**hi** `x`"), "<strong>hi</strong> <code>x</code>");
        assert_eq!(markdown_to_html("<b>raw</b>"), "&lt;b&gt;raw&lt;/b&gt;");
        assert!(markdown_to_html("a\n\nb").contains("<p>a</p>"));
    }
}
