//! Reply fallbacks: the quoted text clients put in front of replies.

/// Removes the reply fallback (leading `> ` lines and the empty line after them) from a body.
pub fn strip_reply_fallback(body: &str) -> &str {
    let mut rest = body;
    let mut stripped = false;
    while rest.starts_with("> ") || rest == ">" || rest.starts_with(">\n") {
        stripped = true;
        rest = rest.split_once('\n').map_or("", |(_, r)| r);
    }
    if stripped { rest.strip_prefix('\n').unwrap_or(rest) } else { body }
}

/// Removes `<mx-reply>…</mx-reply>` from formatted HTML.
pub fn strip_reply_fallback_html(html: &str) -> String {
    let lower = html.to_ascii_lowercase();
    match (lower.find("<mx-reply>"), lower.find("</mx-reply>")) {
        (Some(start), Some(end)) if end > start => {
            format!("{}{}", &html[..start], &html[end + "</mx-reply>".len()..])
        }
        _ => html.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_fallbacks() {
        assert_eq!(strip_reply_fallback("> <@a:x> hi\n> there\n\nanswer"), "answer");
        assert_eq!(strip_reply_fallback("no quote"), "no quote");
        assert_eq!(strip_reply_fallback(">not a quote"), ">not a quote");
        assert_eq!(strip_reply_fallback("> only quote"), "");
        assert_eq!(
            strip_reply_fallback_html("<mx-reply><a>q</a></mx-reply>x<b>y</b>"),
            "x<b>y</b>"
        );
        assert_eq!(strip_reply_fallback_html("<MX-REPLY>q</MX-REPLY>é"), "é");
        assert_eq!(strip_reply_fallback_html("</mx-reply>x<mx-reply>"), "</mx-reply>x<mx-reply>");
    }
}
