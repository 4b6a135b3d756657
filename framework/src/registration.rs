//! The application-service registration file: generation, loading, namespace checks.

use std::{collections::BTreeMap, path::Path};

use rand::{Rng, distr::Alphanumeric};
use regex::Regex;
use serde::{Deserialize, Serialize};

/// An error reading or writing a registration file.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file exists and `--force` was not given.
    #[error(
        "{0} already exists; pass --force to overwrite it (the homeserver must then be given the new file)"
    )]
    Exists(String),
    /// The YAML is malformed or incomplete.
    #[error("{path}: {message}")]
    Parse {
        /// The path.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A namespace regex does not compile.
    #[error("namespace regex {regex:?} is invalid: {source}")]
    Regex {
        /// The regex.
        regex: String,
        /// The regex error.
        source: regex::Error,
    },
}

/// One namespace entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    /// Regex over full ids; generated ones are anchored (`^…$`) and escaped.
    pub regex: String,
    /// Whether only this service may use the ids.
    pub exclusive: bool,
}

impl Namespace {
    /// An exclusive namespace of ids `{sigil}{prefix}…:{domain}`, fully anchored and escaped.
    pub fn prefixed(sigil: char, prefix: &str, domain: &str) -> Self {
        Self {
            regex: format!(
                "^{}{}.*:{}$",
                regex::escape(&sigil.to_string()),
                regex::escape(prefix),
                regex::escape(domain)
            ),
            exclusive: true,
        }
    }

    /// An exclusive namespace of exactly one id.
    pub fn exact(id: &str) -> Self {
        Self { regex: format!("^{}$", regex::escape(id)), exclusive: true }
    }
}

/// The `namespaces` of a registration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespaces {
    /// User ids.
    #[serde(default)]
    pub users: Vec<Namespace>,
    /// Room aliases.
    #[serde(default)]
    pub aliases: Vec<Namespace>,
    /// Room ids.
    #[serde(default)]
    pub rooms: Vec<Namespace>,
}

/// A registration file.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// Unique id of the service.
    pub id: String,
    /// Where the homeserver reaches the service (`null`: no traffic).
    pub url: Option<String>,
    /// Token the service uses towards the homeserver.
    pub as_token: String,
    /// Token the homeserver uses towards the service.
    pub hs_token: String,
    /// Localpart of the service's bot.
    pub sender_localpart: String,
    /// The ids the service manages.
    pub namespaces: Namespaces,
    /// Whether requests are rate limited (generated files say `false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limited: Option<bool>,
    /// Third-party protocols the service provides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<String>,
    /// Ephemeral events (typing, receipts, presence), MSC2409 as merged.
    #[serde(default)]
    pub receive_ephemeral: bool,
    /// The unstable name of the same flag, which older Synapse versions read.
    #[serde(
        rename = "de.sorunome.msc2409.push_ephemeral",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub push_ephemeral_unstable: Option<bool>,
    /// Every other key, kept as is.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_yaml::Value>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("as_token", &"<redacted>")
            .field("hs_token", &"<redacted>")
            .field("sender_localpart", &self.sender_localpart)
            .field("namespaces", &self.namespaces)
            .finish_non_exhaustive()
    }
}

/// A fresh random token (64 alphanumeric characters).
pub fn random_token() -> String {
    rand::rng().sample_iter(&Alphanumeric).take(64).map(char::from).collect()
}

impl Registration {
    /// A registration with fresh random tokens.
    pub fn generate(
        id: &str,
        url: &str,
        sender_localpart: &str,
        namespaces: Namespaces,
        protocols: Vec<String>,
        receive_ephemeral: bool,
    ) -> Self {
        Self {
            id: id.to_owned(),
            url: Some(url.trim_end_matches('/').to_owned()),
            as_token: random_token(),
            hs_token: random_token(),
            sender_localpart: sender_localpart.to_owned(),
            namespaces,
            rate_limited: Some(false),
            protocols,
            receive_ephemeral,
            push_ephemeral_unstable: None,
            extra: BTreeMap::new(),
        }
    }

    /// Reads a registration file.
    pub fn load(path: &Path) -> Result<Self, RegistrationError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| RegistrationError::Io { path: p.clone(), source })?;
        let reg: Self = serde_yaml::from_str(&text)
            .map_err(|e| RegistrationError::Parse { path: p.clone(), message: e.to_string() })?;
        if reg.as_token.is_empty() || reg.hs_token.is_empty() {
            return Err(RegistrationError::Parse {
                path: p,
                message: "as_token and hs_token must not be empty".to_owned(),
            });
        }
        reg.matcher()?;
        Ok(reg)
    }

    /// Writes the registration to `path`; an existing file is only replaced when `force` is set.
    pub fn write(&self, path: &Path, force: bool) -> Result<(), RegistrationError> {
        let p = path.display().to_string();
        if path.exists() && !force {
            return Err(RegistrationError::Exists(p));
        }
        let yaml = serde_yaml::to_string(self)
            .map_err(|e| RegistrationError::Parse { path: p.clone(), message: e.to_string() })?;
        let header = "# Application-service registration generated by Trestle.\n\
                      # Give this file to your homeserver (Synapse: app_service_config_files).\n\
                      # It holds secrets: keep it readable only by the homeserver and the bridge.\n";
        write_private(path, &format!("{header}{yaml}"))
            .map_err(|source| RegistrationError::Io { path: p, source })
    }

    /// Compiled namespace regexes.
    pub fn matcher(&self) -> Result<NamespaceMatcher, RegistrationError> {
        let compile = |list: &[Namespace]| -> Result<Vec<Regex>, RegistrationError> {
            list.iter()
                .map(|n| {
                    Regex::new(&n.regex).map_err(|source| RegistrationError::Regex {
                        regex: n.regex.clone(),
                        source,
                    })
                })
                .collect()
        };
        Ok(NamespaceMatcher {
            users: compile(&self.namespaces.users)?,
            aliases: compile(&self.namespaces.aliases)?,
            rooms: compile(&self.namespaces.rooms)?,
        })
    }
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

/// Compiled namespaces of a registration.
#[derive(Debug, Clone)]
pub struct NamespaceMatcher {
    users: Vec<Regex>,
    aliases: Vec<Regex>,
    rooms: Vec<Regex>,
}

impl NamespaceMatcher {
    /// Whether a user id is in the user namespaces. Regexes are applied to the whole id, whether
    /// or not they are anchored (as Synapse does for generated, anchored ones).
    pub fn is_user(&self, user_id: &str) -> bool {
        full_match(&self.users, user_id)
    }
    /// Whether an alias is in the alias namespaces.
    pub fn is_alias(&self, alias: &str) -> bool {
        full_match(&self.aliases, alias)
    }
    /// Whether a room id is in the room namespaces.
    pub fn is_room(&self, room_id: &str) -> bool {
        full_match(&self.rooms, room_id)
    }
}

fn full_match(list: &[Regex], s: &str) -> bool {
    list.iter().any(|r| r.find(s).is_some_and(|m| m.start() == 0 && m.end() == s.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registration {
        Registration::generate(
            "irc",
            "http://127.0.0.1:9999/",
            "ircbot",
            Namespaces {
                users: vec![Namespace::prefixed('@', "irc_", "example.org")],
                aliases: vec![Namespace::prefixed('#', "irc_", "example.org")],
                rooms: vec![],
            },
            vec!["irc".into()],
            true,
        )
    }

    #[test]
    fn generated_registration_round_trips_and_matches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.yaml");
        let r = reg();
        assert_eq!(r.url.as_deref(), Some("http://127.0.0.1:9999"));
        assert_eq!(r.as_token.len(), 64);
        assert_ne!(r.as_token, r.hs_token);
        r.write(&path, false).unwrap();
        assert!(matches!(r.write(&path, false), Err(RegistrationError::Exists(_))));
        r.write(&path, true).unwrap();
        let back = Registration::load(&path).unwrap();
        assert_eq!(back, r);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("rate_limited: false"));
        assert!(text.contains(r"regex: ^@irc_.*:example\.org$"));
        let m = back.matcher().unwrap();
        assert!(m.is_user("@irc_alice:example.org"));
        assert!(!m.is_user("@irc_alice:example.org.evil"));
        assert!(!m.is_user("@irc_alice:exampleXorg"));
        assert!(!m.is_user("@alice:example.org"));
        assert!(m.is_alias("#irc_local_#test:example.org"));
        assert!(!format!("{back:?}").contains(&back.hs_token));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0);
        }
    }

    #[test]
    fn unanchored_foreign_regexes_match_whole_ids() {
        let mut r = reg();
        r.namespaces.users = vec![Namespace { regex: "@irc_.*".into(), exclusive: true }];
        let m = r.matcher().unwrap();
        assert!(m.is_user("@irc_x:y"));
        assert!(!m.is_user("x@irc_x:y"));
    }
}
