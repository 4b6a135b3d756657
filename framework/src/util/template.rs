//! Id templates such as `irc_{network}_{nick}`: rendering, reverse parsing, and the anchored
//! regex a registration namespace needs.

/// A template error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{` without `}`.
    #[error("unclosed placeholder in template {0:?}")]
    Unclosed(String),
    /// A placeholder not in the allowed list.
    #[error("unknown placeholder {{{0}}}")]
    Unknown(String),
    /// Two placeholders with nothing between them cannot be parsed back.
    #[error("placeholders {{{0}}} and {{{1}}} must be separated by literal text")]
    Adjacent(String, String),
    /// No value for a placeholder.
    #[error("no value for {{{0}}}")]
    Missing(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Var(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses `s`; placeholders must be among `allowed`.
    pub fn parse(s: &str, allowed: &[&str]) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_owned()));
            }
            let close =
                rest[open..].find('}').ok_or_else(|| TemplateError::Unclosed(s.to_owned()))? + open;
            let name = &rest[open + 1..close];
            if !allowed.contains(&name) {
                return Err(TemplateError::Unknown(name.to_owned()));
            }
            if let Some(Part::Var(prev)) = parts.last() {
                return Err(TemplateError::Adjacent(prev.clone(), name.to_owned()));
            }
            parts.push(Part::Var(name.to_owned()));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_owned()));
        }
        Ok(Self { parts })
    }

    /// Whether the template uses `var`.
    pub fn has(&self, var: &str) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Var(v) if v == var))
    }

    /// Fills in the placeholders.
    pub fn render(&self, vars: &[(&str, &str)]) -> Result<String, TemplateError> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Var(v) => {
                    let val = vars
                        .iter()
                        .find(|(k, _)| k == v)
                        .ok_or_else(|| TemplateError::Missing(v.clone()))?
                        .1;
                    out.push_str(val);
                }
            }
        }
        Ok(out)
    }

    /// An anchored regex matching every rendering; variables in `fixed` are literal, others `.+`.
    pub fn to_regex(&self, fixed: &[(&str, &str)]) -> String {
        let mut out = String::from("^");
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(&regex::escape(l)),
                Part::Var(v) => match fixed.iter().find(|(k, _)| k == v) {
                    Some((_, val)) => out.push_str(&regex::escape(val)),
                    None => out.push_str(".+"),
                },
            }
        }
        out.push('$');
        out
    }

    /// Parses a rendering back into its variables (those in `fixed` must match exactly).
    /// Variables match as little as possible, so a literal separator may appear inside the last one.
    pub fn extract(&self, s: &str, fixed: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        let mut out = Vec::new();
        let mut rest = s;
        let mut i = 0;
        while i < self.parts.len() {
            match &self.parts[i] {
                Part::Lit(l) => rest = rest.strip_prefix(l.as_str())?,
                Part::Var(v) => {
                    let value = match self.parts.get(i + 1) {
                        Some(Part::Lit(next)) => {
                            let (val, _) = rest.split_once(next.as_str())?;
                            val
                        }
                        _ => rest,
                    };
                    if value.is_empty() {
                        return None;
                    }
                    if let Some((_, want)) = fixed.iter().find(|(k, _)| k == v)
                        && *want != value
                    {
                        return None;
                    }
                    out.push((v.clone(), value.to_owned()));
                    rest = &rest[value.len()..];
                }
            }
            i += 1;
        }
        rest.is_empty().then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_extract_regex() {
        let t = Template::parse("irc_{network}_{nick}", &["network", "nick"]).unwrap();
        let id = t.render(&[("network", "libera"), ("nick", "al_ice")]).unwrap();
        assert_eq!(id, "irc_libera_al_ice");
        let vars = t.extract(&id, &[("network", "libera")]).unwrap();
        assert_eq!(vars[1], ("nick".to_owned(), "al_ice".to_owned()));
        assert!(t.extract("irc_oftc_x", &[("network", "libera")]).is_none());
        assert!(t.extract("xmpp_libera_x", &[]).is_none());
        let re = regex::Regex::new(&t.to_regex(&[("network", "libera")])).unwrap();
        assert!(re.is_match("irc_libera_bob"));
        assert!(!re.is_match("irc_libera_"));
        assert!(!re.is_match("xirc_libera_bob"));
        assert_eq!(t.render(&[("nick", "x")]), Err(TemplateError::Missing("network".into())));
    }

    #[test]
    fn parse_errors() {
        assert!(matches!(Template::parse("a_{nick", &["nick"]), Err(TemplateError::Unclosed(_))));
        assert!(matches!(Template::parse("a_{oops}", &["nick"]), Err(TemplateError::Unknown(_))));
        assert!(matches!(Template::parse("{a}{b}", &["a", "b"]), Err(TemplateError::Adjacent(..))));
        let t = Template::parse("#irc_{network}_{channel}", &["network", "channel"]).unwrap();
        assert!(t.to_regex(&[]).starts_with(r"^\#irc_"));
    }
}
