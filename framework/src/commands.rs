//! Bot commands for the admin room: parsing, permission levels, dispatch, and `help`.
//!
//! ```ignore
//! registry.add(Command::new("join", "<#channel>", "Join a channel", PermissionLevel::User,
//!     |inv, bridge: Arc<MyBridge>| Box::pin(async move { bridge.join(&inv.args[0]).await })));
//! ```

use std::{collections::BTreeMap, fmt, future::Future, pin::Pin, sync::Arc};

pub use crate::config::PermissionLevel;

/// A boxed command future.
pub type CommandFuture = Pin<Box<dyn Future<Output = Result<String, CommandError>> + Send>>;

type Handler<C> = Arc<dyn Fn(CommandInvocation, Arc<C>) -> CommandFuture + Send + Sync>;

/// Why a command failed (shown to the user).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No such command.
    #[error("unknown command `{0}`; send !help for the list")]
    Unknown(String),
    /// The user's level is too low.
    #[error("you are not allowed to use `{0}`")]
    NotAllowed(String),
    /// The arguments are wrong.
    #[error("usage: {0}")]
    Usage(String),
    /// The line could not be parsed.
    #[error("cannot parse the command: {0}")]
    Parse(String),
    /// The command ran and failed.
    #[error("{0}")]
    Failed(String),
}

/// One call of a command.
#[derive(Debug, Clone)]
pub struct CommandInvocation {
    /// The command name as registered (not the alias typed).
    pub command: String,
    /// Arguments, unquoted.
    pub args: Vec<String>,
    /// Who sent it.
    pub sender: String,
    /// Their permission level.
    pub level: PermissionLevel,
    /// How the command is called: its name and its usage, e.g. `nick <nick> [network]`.
    pub usage: String,
}

impl CommandInvocation {
    /// Argument `i`, or a usage error.
    pub fn arg(&self, i: usize) -> Result<&str, CommandError> {
        self.args.get(i).map(String::as_str).ok_or_else(|| self.usage_error())
    }

    /// The error telling how the command is called.
    pub fn usage_error(&self) -> CommandError {
        CommandError::Usage(self.usage.clone())
    }
}

/// A command definition.
pub struct Command<C> {
    name: String,
    aliases: Vec<String>,
    usage: String,
    help: String,
    level: PermissionLevel,
    handler: Handler<C>,
}

impl<C> fmt::Debug for Command<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Command").field("name", &self.name).field("level", &self.level).finish()
    }
}

impl<C: Send + Sync + 'static> Command<C> {
    /// A command `name` with its usage (arguments), help text, required level and handler.
    pub fn new<F>(name: &str, usage: &str, help: &str, level: PermissionLevel, handler: F) -> Self
    where
        F: Fn(CommandInvocation, Arc<C>) -> CommandFuture + Send + Sync + 'static,
    {
        Self {
            name: name.to_ascii_lowercase(),
            aliases: Vec::new(),
            usage: usage.to_owned(),
            help: help.to_owned(),
            level,
            handler: Arc::new(handler),
        }
    }

    /// Adds an alias.
    #[must_use]
    pub fn alias(mut self, alias: &str) -> Self {
        self.aliases.push(alias.to_ascii_lowercase());
        self
    }
}

/// The commands a bot understands.
pub struct CommandRegistry<C> {
    prefix: String,
    commands: BTreeMap<String, Command<C>>,
    aliases: BTreeMap<String, String>,
}

impl<C> fmt::Debug for CommandRegistry<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandRegistry").field("commands", &self.commands.keys()).finish()
    }
}

/// Splits a command line into words: `"…"` and `'…'` group, `\` escapes. Control characters
/// (NUL, CR, LF, …) are refused: arguments often end up in network protocols.
pub fn split_args(line: &str) -> Result<Vec<String>, CommandError> {
    if let Some(c) = line.chars().find(|c| c.is_control() && *c != '\t') {
        return Err(CommandError::Parse(format!(
            "control character U+{:04X} not allowed",
            c as u32
        )));
    }
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (c, quote) {
            ('\\', _) => match chars.next() {
                Some(n) => {
                    cur.push(n);
                    in_word = true;
                }
                None => return Err(CommandError::Parse("trailing backslash".into())),
            },
            (q @ ('"' | '\''), None) => {
                quote = Some(q);
                in_word = true;
            }
            (c, Some(q)) if c == q => quote = None,
            (c, None) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (c, _) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(CommandError::Parse("unclosed quote".into()));
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

impl<C: Send + Sync + 'static> CommandRegistry<C> {
    /// An empty registry for lines starting with `prefix` (e.g. `!`).
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned(), commands: BTreeMap::new(), aliases: BTreeMap::new() }
    }

    /// Registers a command (replacing one of the same name).
    pub fn add(&mut self, command: Command<C>) -> &mut Self {
        for a in &command.aliases {
            self.aliases.insert(a.clone(), command.name.clone());
        }
        self.commands.insert(command.name.clone(), command);
        self
    }

    /// The help text listing what `level` may run.
    pub fn help(&self, level: PermissionLevel) -> String {
        let mut out = String::from("Commands:\n");
        out.push_str(&format!("{}help — this list\n", self.prefix));
        for c in self.commands.values().filter(|c| c.level <= level) {
            let usage = if c.usage.is_empty() { String::new() } else { format!(" {}", c.usage) };
            out.push_str(&format!("{}{}{} — {}\n", self.prefix, c.name, usage, c.help));
        }
        out.trim_end().to_owned()
    }

    /// Runs `line` for `sender`. `None` if the line is not a command (no prefix).
    pub async fn dispatch(
        &self,
        sender: &str,
        level: PermissionLevel,
        line: &str,
        ctx: Arc<C>,
    ) -> Option<Result<String, CommandError>> {
        let rest = line.trim_start().strip_prefix(&self.prefix)?;
        let words = match split_args(rest) {
            Ok(w) => w,
            Err(e) => return Some(Err(e)),
        };
        let (name, args) = words.split_first()?;
        let name = name.to_ascii_lowercase();
        if name == "help" {
            return Some(Ok(self.help(level)));
        }
        let key = self.aliases.get(&name).cloned().unwrap_or(name.clone());
        let Some(cmd) = self.commands.get(&key) else {
            return Some(Err(CommandError::Unknown(name)));
        };
        if level < cmd.level {
            return Some(Err(CommandError::NotAllowed(cmd.name.clone())));
        }
        let inv = CommandInvocation {
            command: cmd.name.clone(),
            args: args.to_vec(),
            sender: sender.to_owned(),
            level,
            usage: format!("{} {}", cmd.name, cmd.usage).trim_end().to_owned(),
        };
        Some((cmd.handler)(inv, ctx).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ctx(&'static str);

    fn registry() -> CommandRegistry<Ctx> {
        let mut r = CommandRegistry::new("!");
        r.add(
            Command::new(
                "echo",
                "<text>",
                "Repeat",
                PermissionLevel::User,
                |inv, ctx: Arc<Ctx>| {
                    Box::pin(async move { Ok(format!("{}{}", ctx.0, inv.args.join("|"))) })
                },
            )
            .alias("say"),
        );
        r.add(Command::new("nuke", "", "Admins only", PermissionLevel::Admin, |_, _| {
            Box::pin(async { Ok("boom".to_owned()) })
        }));
        r
    }

    #[tokio::test]
    async fn dispatch_levels_aliases_help() {
        let r = registry();
        let ctx = Arc::new(Ctx(">"));
        let run = |line: &'static str, level| {
            let ctx = Arc::clone(&ctx);
            let r = &r;
            async move { r.dispatch("@u:x", level, line, ctx).await }
        };
        assert_eq!(
            run("!echo a \"b c\" 'd'", PermissionLevel::User).await,
            Some(Ok(">a|b c|d".into()))
        );
        assert_eq!(run("!SAY x", PermissionLevel::User).await, Some(Ok(">x".into())));
        assert_eq!(run("hello", PermissionLevel::User).await, None);
        assert_eq!(
            run("!nuke", PermissionLevel::User).await,
            Some(Err(CommandError::NotAllowed("nuke".into())))
        );
        assert_eq!(run("!nuke", PermissionLevel::Admin).await, Some(Ok("boom".into())));
        assert!(matches!(
            run("!what", PermissionLevel::User).await,
            Some(Err(CommandError::Unknown(_)))
        ));
        let help = run("!help", PermissionLevel::User).await.unwrap().unwrap();
        assert!(help.contains("!echo <text>") && !help.contains("nuke"));
        assert!(matches!(
            run("!echo a\r\nQUIT", PermissionLevel::User).await,
            Some(Err(CommandError::Parse(_)))
        ));
    }

    #[test]
    fn splitting() {
        assert_eq!(split_args(r#"a "b \" c" d\ e"#).unwrap(), ["a", "b \" c", "d e"]);
        assert_eq!(split_args("''").unwrap(), [""]);
        assert!(split_args("\"open").is_err());
        assert!(split_args("a\0b").is_err());
    }
}
