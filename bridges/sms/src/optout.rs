//! Opt-out keywords (CTIA / carrier practice, as Twilio honours them): a message that is only
//! one of these words changes whether the sender may be messaged.

/// What a keyword asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    /// Stop all messages to this number (STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT).
    Stop,
    /// Allow messages again (START, UNSTOP, YES).
    Start,
    /// Ask for help (HELP, INFO).
    Help,
}

/// The keyword a message is, if it is one: the whole text, ignoring case, surrounding
/// whitespace and trailing punctuation (`Stop.`, ` stop! `). `STOP please` is not a keyword.
pub fn classify(text: &str) -> Option<Keyword> {
    let word = text.trim().trim_end_matches(['.', '!', '?', ',', ';']).trim();
    if word.is_empty() || word.chars().any(char::is_whitespace) || word.len() > 16 {
        return None;
    }
    match word.to_ascii_uppercase().as_str() {
        "STOP" | "STOPALL" | "UNSUBSCRIBE" | "CANCEL" | "END" | "QUIT" => Some(Keyword::Stop),
        "START" | "UNSTOP" | "YES" => Some(Keyword::Start),
        "HELP" | "INFO" => Some(Keyword::Help),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords() {
        for w in ["STOP", "stop", " Stop. ", "STOPALL", "unsubscribe", "Cancel", "END", "quit!"] {
            assert_eq!(classify(w), Some(Keyword::Stop), "{w}");
        }
        for w in ["START", "unstop", "Yes"] {
            assert_eq!(classify(w), Some(Keyword::Start), "{w}");
        }
        for w in ["HELP", "help?", "Info"] {
            assert_eq!(classify(w), Some(Keyword::Help), "{w}");
        }
    }

    #[test]
    fn not_keywords() {
        for w in ["", "   ", "STOP please", "don't stop", "stopp", "HELPME", "start now", "ßtop"] {
            assert_eq!(classify(w), None, "{w:?}");
        }
    }
}
