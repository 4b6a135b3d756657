//! Phone numbers: E.164 normalisation with the `phonenumber` crate (libphonenumber metadata).
//!
//! A number is parsed with a default region (for national formats such as `07700 900123`) and
//! written as E.164 (`+447700900123`). Leading zeros of the national significant number (Italy's
//! fixed lines, `+390612345678`) are kept: the number is formatted by the library, never rebuilt
//! from the country code and an integer.

use std::fmt;

use phonenumber::{Mode, country};

/// Why a number was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NumberError {
    /// The text is not a phone number at all.
    #[error("not a phone number: {0}")]
    Unparseable(String),
    /// It parses, but the numbering plan says no such number can exist.
    #[error("not a valid phone number: {0}")]
    Invalid(String),
    /// The configured default region is not a two-letter region code the library knows.
    #[error("unknown region code {0}")]
    UnknownRegion(String),
}

/// A phone number in E.164 form: `+` and 8 to 15 digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct E164(String);

impl E164 {
    /// The number as text (`+447700900123`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Accepts text already in strict E.164 form, without consulting the numbering plan.
    pub fn from_e164(s: &str) -> Option<Self> {
        let digits = s.strip_prefix('+')?;
        (digits.len() >= 7
            && digits.len() <= 15
            && !digits.starts_with('0')
            && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| Self(s.to_owned()))
    }
}

impl fmt::Display for E164 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How strictly numbers are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Validation {
    /// The number must be valid in its region's numbering plan (libphonenumber `isValidNumber`).
    Strict,
    /// The number must parse and have a plausible length (7–15 digits). Accepts reserved test
    /// ranges such as the UK's 07700 900xxx drama numbers.
    #[default]
    Lenient,
}

/// Parses a region code (`GB`, `de`) for [`normalize`].
pub fn parse_region(code: &str) -> Result<country::Id, NumberError> {
    code.trim()
        .to_ascii_uppercase()
        .parse::<country::Id>()
        .map_err(|_| NumberError::UnknownRegion(code.to_owned()))
}

/// Normalises `input` (international `+44 7700 900123`, `0044…`, or national `07700 900123` in
/// `region`) to E.164.
pub fn normalize(
    input: &str,
    region: Option<country::Id>,
    validation: Validation,
) -> Result<E164, NumberError> {
    let trimmed = input.trim();
    if trimmed.is_empty() || trimmed.chars().any(|c| c.is_alphabetic()) {
        return Err(NumberError::Unparseable(input.to_owned()));
    }
    // `00` international prefix: libphonenumber only knows it through the region's metadata,
    // so accept it regardless of the region.
    let owned;
    let text = match trimmed.strip_prefix("00") {
        Some(rest) if !rest.starts_with('0') => {
            owned = format!("+{rest}");
            owned.as_str()
        }
        _ => trimmed,
    };
    let number =
        phonenumber::parse(region, text).map_err(|_| NumberError::Unparseable(input.to_owned()))?;
    if validation == Validation::Strict && !number.is_valid() {
        return Err(NumberError::Invalid(input.to_owned()));
    }
    let e164 = number.format().mode(Mode::E164).to_string();
    E164::from_e164(&e164).ok_or_else(|| NumberError::Invalid(input.to_owned()))
}

/// The sender or recipient of an SMS as a gateway reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A phone number.
    Number(E164),
    /// A short code (3–8 digits, no country), e.g. `12345`.
    Short(String),
    /// An alphanumeric sender id (`MyBank`): cannot be replied to.
    Alpha(String),
}

impl Address {
    /// Classifies what a gateway reported: a phone number if it normalises, else a short code,
    /// else an alphanumeric sender (lowercased, limited to letters, digits, `.`, `-`, `_`).
    pub fn classify(
        input: &str,
        region: Option<country::Id>,
        validation: Validation,
    ) -> Option<Self> {
        let t = input.trim();
        if !t.is_empty() && t.len() <= 8 && t.bytes().all(|b| b.is_ascii_digit()) {
            return Some(Self::Short(t.to_owned()));
        }
        if let Ok(n) = normalize(t, region, validation) {
            return Some(Self::Number(n));
        }
        let alpha: String = t
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            .map(|c| c.to_ascii_lowercase())
            .collect();
        // An alphanumeric sender id has at least one letter; digits that fail as a number are
        // not one.
        (alpha.bytes().any(|b| b.is_ascii_lowercase()) && alpha.len() <= 16)
            .then_some(Self::Alpha(alpha))
    }

    /// The key used in ghost ids and portal ids: `+447700900123`, `12345`, `a.mybank`.
    pub fn key(&self) -> String {
        match self {
            Self::Number(n) => n.to_string(),
            Self::Short(s) => s.clone(),
            Self::Alpha(a) => format!("a.{a}"),
        }
    }

    /// Parses a [`key`](Self::key) back.
    pub fn from_key(key: &str) -> Option<Self> {
        if let Some(a) = key.strip_prefix("a.") {
            return (!a.is_empty()).then(|| Self::Alpha(a.to_owned()));
        }
        if key.starts_with('+') {
            return E164::from_e164(key).map(Self::Number);
        }
        (!key.is_empty() && key.len() <= 8 && key.bytes().all(|b| b.is_ascii_digit()))
            .then(|| Self::Short(key.to_owned()))
    }

    /// What the gateway is given as a destination (E.164 or the short code).
    pub fn dial(&self) -> Option<&str> {
        match self {
            Self::Number(n) => Some(n.as_str()),
            Self::Short(s) => Some(s),
            Self::Alpha(_) => None,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Short(s) | Self::Alpha(s) => f.write_str(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gb() -> Option<country::Id> {
        Some(parse_region("GB").unwrap())
    }

    #[test]
    fn international_and_national_forms() {
        for input in [
            "+44 7700 900123",
            "+447700900123",
            "07700 900123",
            "0044 7700 900123",
            "(07700) 900-123",
        ] {
            assert_eq!(
                normalize(input, gb(), Validation::Lenient).unwrap().as_str(),
                "+447700900123",
                "{input}"
            );
        }
        // A number with its own country code ignores the default region.
        assert_eq!(
            normalize("+1 415 555 2671", gb(), Validation::Strict).unwrap().as_str(),
            "+14155552671"
        );
        assert_eq!(
            normalize("(415) 555-2671", Some(parse_region("us").unwrap()), Validation::Strict)
                .unwrap()
                .as_str(),
            "+14155552671"
        );
    }

    #[test]
    fn italian_leading_zero_is_kept() {
        let it = Some(parse_region("IT").unwrap());
        assert_eq!(
            normalize("06 1234 5678", it, Validation::Strict).unwrap().as_str(),
            "+390612345678"
        );
        assert_eq!(
            normalize("+39 06 1234 5678", None, Validation::Strict).unwrap().as_str(),
            "+390612345678"
        );
    }

    #[test]
    fn strict_and_lenient() {
        // 07700 900xxx is reserved for drama: not valid in the plan, but plausible.
        assert!(normalize("+447700900123", None, Validation::Lenient).is_ok());
        assert!(matches!(
            normalize("+447700900123", None, Validation::Strict),
            Err(NumberError::Invalid(_))
        ));
        assert!(normalize("+447911123456", None, Validation::Strict).is_ok());
    }

    #[test]
    fn rejects_garbage() {
        assert!(normalize("", gb(), Validation::Lenient).is_err());
        assert!(normalize("hello", gb(), Validation::Lenient).is_err());
        assert!(normalize("+44 77OO 900123", gb(), Validation::Lenient).is_err());
        // National number without a default region.
        assert!(normalize("07700 900123", None, Validation::Lenient).is_err());
        assert!(matches!(parse_region("XX"), Err(NumberError::UnknownRegion(_))));
    }

    #[test]
    fn e164_strict_form() {
        assert!(E164::from_e164("+447700900123").is_some());
        assert!(E164::from_e164("447700900123").is_none());
        assert!(E164::from_e164("+0447700900123").is_none());
        assert!(E164::from_e164("+4477009001234567").is_none());
        assert!(E164::from_e164("+44a").is_none());
    }

    #[test]
    fn addresses() {
        assert_eq!(
            Address::classify("+447700900123", gb(), Validation::Lenient),
            Some(Address::Number(E164("+447700900123".into())))
        );
        assert_eq!(
            Address::classify("12345", gb(), Validation::Lenient),
            Some(Address::Short("12345".into()))
        );
        let bank = Address::classify("My Bank!", gb(), Validation::Lenient).unwrap();
        assert_eq!(bank, Address::Alpha("mybank".into()));
        assert_eq!(bank.dial(), None);
        for a in
            [Address::Number(E164("+447700900123".into())), Address::Short("12345".into()), bank]
        {
            assert_eq!(Address::from_key(&a.key()), Some(a.clone()));
        }
        assert_eq!(Address::from_key("+12"), None);
        // Digits that are no valid number are not an alphanumeric sender either.
        assert_eq!(Address::classify("+447700900123", None, Validation::Strict), None);
        assert_eq!(Address::classify("123456789012", None, Validation::Lenient), None);
        assert_eq!(Address::from_key("a."), None);
    }
}
