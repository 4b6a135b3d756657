//! IRC bans (`MODE +b mask`) mirrored as Matrix bans, and the hostmasks they are matched
//! against.
//!
//! The bot learns `user@host` of every nick it sees: from the prefix of any line (JOIN,
//! PRIVMSG, …, its puppets' included), from `WHO` replies when it joins a channel, and from
//! `CHGHOST`. That is the host the server shows other users (cloaked, where the server cloaks),
//! which is what channel bans are matched against.
//!
//! A ban set on IRC bans, in the portal, every party of the room whose `nick!user@host` the
//! mask matches (IRC globs `*` and `?`, under the server's CASEMAPPING): ghosts, and Matrix
//! users through their puppets. What each mask banned is kept in the store's key-value table,
//! per portal, so that lifting it (`MODE -b mask`), even after a restart, unbans them, unless
//! another ban still in force names them. Extended bans (`~a:acct`, `$a:acct`, `R:acct`, …)
//! are not hostmasks and are ignored. Bans the bot itself sets (a Matrix moderator banned a
//! ghost) are never mirrored back.

use std::collections::{BTreeMap, BTreeSet};

use trestle::bridge::BridgeError;

use super::{Inner, Network, lock};
use crate::conn::{CaseMapping, IrcLine, Source};

/// Hostmasks remembered per network at most; beyond, the map starts afresh (WHO refills it).
const MAX_HOSTS: usize = 200_000;

/// Ban masks remembered per portal at most; beyond, those that banned nobody are forgotten
/// (they only serve to keep others banned when a mask is lifted).
const MAX_MASKS: usize = 500;

/// A channel ban mask that is a hostmask, normalised to `nick!user@host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BanMask {
    /// The normalised mask, as set.
    mask: String,
    /// Whether it matches on the nick alone (`nick!*@*`): then a party whose host is not
    /// known can still be matched.
    nick_only: bool,
}

impl BanMask {
    /// The hostmask ban in `mask`, or `None` for an extended ban (`~a:account`, `$a:account`,
    /// `R:account`, `account:name`, …) or an empty one. Partial masks are completed the way
    /// servers do: `nick` → `nick!*@*`, `user@host` → `*!user@host`, `nick!user` →
    /// `nick!user@*`.
    pub(super) fn parse(mask: &str) -> Option<Self> {
        if mask.is_empty() || mask.starts_with(['~', '$', '%']) || mask.len() > 512 {
            return None;
        }
        // Nicks, user names and hosts before the `@` never hold a `:`; extended bans always
        // do, after their type.
        let head = mask.split('@').next().unwrap_or(mask);
        if head.contains(':') {
            return None;
        }
        let full = match (mask.find('!'), mask.find('@')) {
            (Some(b), Some(a)) if b < a => mask.to_owned(),
            (None, Some(_)) => format!("*!{mask}"),
            (Some(_), None) => format!("{mask}@*"),
            (None, None) => format!("{mask}!*@*"),
            (Some(_), Some(_)) => return None,
        };
        let rest = full.split_once('!').map_or("", |(_, r)| r);
        let nick_only = rest.chars().all(|c| c == '*' || c == '@');
        Some(Self { mask: full, nick_only })
    }

    /// The normalised mask.
    pub(super) fn as_str(&self) -> &str {
        &self.mask
    }

    /// Whether the mask matches `nick` whose `user@host` is `userhost` (if known).
    pub(super) fn matches(&self, cm: CaseMapping, nick: &str, userhost: Option<&str>) -> bool {
        match userhost {
            Some(uh) => glob(&cm.fold(&self.mask), &cm.fold(&format!("{nick}!{uh}"))),
            None if self.nick_only => {
                let pattern = self.mask.split('!').next().unwrap_or_default();
                glob(&cm.fold(pattern), &cm.fold(nick))
            }
            None => false,
        }
    }
}

/// IRC glob matching: `*` is any run of characters, `?` any one character.
pub(super) fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it is trying to cover up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// What each ban mask of a portal banned on Matrix: folded mask → (mask, Matrix user ids).
type BanRecord = BTreeMap<String, (String, BTreeSet<String>)>;

fn record_key(portal_remote_id: &str) -> String {
    format!("irc/bans/{portal_remote_id}")
}

impl Network {
    /// Learns the `user@host` of a line's source.
    pub(super) fn note_host(&self, line: &IrcLine) {
        if let Some(Source::User { nick, user, host }) = &line.source
            && !user.is_empty()
            && !host.is_empty()
        {
            self.set_host(nick, &format!("{user}@{host}"));
        }
    }

    /// Records `nick`'s `user@host`.
    pub(super) fn set_host(&self, nick: &str, userhost: &str) {
        let mut hosts = lock(&self.hosts);
        if hosts.len() >= MAX_HOSTS {
            hosts.clear();
        }
        hosts.insert(self.fold(nick), userhost.to_owned());
    }

    /// A nick changed (its host goes with it) or quit (`new` is `None`).
    pub(super) fn move_host(&self, old: &str, new: Option<&str>) {
        let mut hosts = lock(&self.hosts);
        let uh = hosts.remove(&self.fold(old));
        if let (Some(new), Some(uh)) = (new, uh) {
            hosts.insert(self.fold(new), uh);
        }
    }

    /// `nick`'s `user@host`, if known.
    pub(super) fn host_of(&self, nick: &str) -> Option<String> {
        lock(&self.hosts).get(&self.fold(nick)).cloned()
    }
}

impl Inner {
    async fn ban_record(&self, portal_remote_id: &str) -> Result<BanRecord, BridgeError> {
        let raw = self.ctx.store().kv_get(&record_key(portal_remote_id)).await?;
        Ok(raw.and_then(|r| serde_json::from_str(&r).ok()).unwrap_or_default())
    }

    async fn save_ban_record(
        &self,
        portal_remote_id: &str,
        record: &BanRecord,
    ) -> Result<(), BridgeError> {
        let key = record_key(portal_remote_id);
        if record.is_empty() {
            self.ctx.store().kv_delete(&key).await?;
        } else {
            let value = serde_json::to_string(record).map_err(super::bridge_err)?;
            self.ctx.store().kv_set(&key, &value).await?;
        }
        Ok(())
    }

    /// The parties of `room_id` whose hostmask `mask` matches: (Matrix user id, the nick it is
    /// on IRC). Ghosts of this network, and Matrix users through their puppets.
    async fn ban_targets(
        &self,
        net: &Network,
        room_id: &str,
        mask: &BanMask,
    ) -> Result<Vec<(String, String)>, BridgeError> {
        let cm = net.bot.isupport().casemapping;
        let mut out = Vec::new();
        for user in self.ctx.store().members(room_id, "join").await? {
            let nick = match net.nick_of_ghost(&user) {
                Some(nick) => nick,
                None if !self.ctx.is_bridge_user(&user) => match net.puppets.get(&user) {
                    Some(p) => p.conn.nick(),
                    None => continue,
                },
                None => continue,
            };
            if mask.matches(cm, &nick, net.host_of(&nick).as_deref()) {
                out.push((user, nick));
            }
        }
        Ok(out)
    }

    /// `MODE chan +b mask` by `by`: the parties of the portal it matches are banned there.
    pub(super) async fn irc_ban(
        self: &std::sync::Arc<Self>,
        net: &std::sync::Arc<Network>,
        chan: &str,
        portal: &trestle::store::Portal,
        by: &str,
        mask: &str,
    ) -> Result<(), BridgeError> {
        let Some(ban) = BanMask::parse(mask) else {
            tracing::debug!(network = net.id, chan, mask, "not a hostmask ban; not mirrored");
            return Ok(());
        };
        let targets = self.ban_targets(net, &portal.room_id, &ban).await?;
        let reason =
            crate::format::strip_codes(&format!("banned on IRC by {by} ({})", ban.as_str()));
        let mut banned = BTreeSet::new();
        for (user, nick) in targets {
            match self.ctx.bot().ban(&portal.room_id, &user, Some(&reason)).await {
                Ok(()) => {
                    tracing::info!(
                        network = net.id,
                        chan,
                        mask = ban.as_str(),
                        user,
                        nick,
                        "IRC ban mirrored"
                    );
                    banned.insert(user.clone());
                }
                Err(e) => {
                    tracing::warn!(network = net.id, chan, user, error = %e, "could not ban in the portal");
                    continue;
                }
            }
            if net.nick_of_ghost(&user).is_none() {
                // A Matrix user: their puppet leaves the channel (the bot's ban is not seen
                // by the bridge as a Matrix event of its own).
                self.puppet_part(net, &user, chan).await;
            }
        }
        let folded = net.fold(ban.as_str());
        let mut record = self.ban_record(&portal.remote_id).await?;
        let entry =
            record.entry(folded).or_insert_with(|| (ban.as_str().to_owned(), BTreeSet::new()));
        entry.1.extend(banned);
        if record.len() > MAX_MASKS {
            record.retain(|_, (_, users)| !users.is_empty());
        }
        self.save_ban_record(&portal.remote_id, &record).await
    }

    /// `MODE chan -b mask` by `by`: those the mask banned are unbanned, unless another ban
    /// still in force names them.
    pub(super) async fn irc_unban(
        &self,
        net: &Network,
        chan: &str,
        portal: &trestle::store::Portal,
        by: &str,
        mask: &str,
    ) -> Result<(), BridgeError> {
        let Some(ban) = BanMask::parse(mask) else {
            tracing::debug!(network = net.id, chan, mask, "not a hostmask ban; not mirrored");
            return Ok(());
        };
        let mut record = self.ban_record(&portal.remote_id).await?;
        let Some((_, users)) = record.remove(&net.fold(ban.as_str())) else {
            return Ok(());
        };
        let cm = net.bot.isupport().casemapping;
        let reason =
            crate::format::strip_codes(&format!("unbanned on IRC by {by} ({})", ban.as_str()));
        for user in users {
            // Still banned by another mask: by what it banned then, or by who they are now.
            let nick =
                net.nick_of_ghost(&user).or_else(|| net.puppets.get(&user).map(|p| p.conn.nick()));
            let host = nick.as_deref().and_then(|n| net.host_of(n));
            let other = record.values_mut().find(|(m, banned)| {
                banned.contains(&user)
                    || nick.as_deref().is_some_and(|n| {
                        BanMask::parse(m).is_some_and(|b| b.matches(cm, n, host.as_deref()))
                    })
            });
            if let Some((m, banned)) = other {
                tracing::debug!(
                    network = net.id,
                    chan,
                    user,
                    still = m.as_str(),
                    "still banned by another mask"
                );
                banned.insert(user);
                continue;
            }
            match self.ctx.bot().unban(&portal.room_id, &user, Some(&reason)).await {
                Ok(()) => tracing::info!(
                    network = net.id,
                    chan,
                    mask = ban.as_str(),
                    user,
                    "IRC unban mirrored"
                ),
                Err(e) => {
                    tracing::warn!(network = net.id, chan, user, error = %e, "could not unban in the portal")
                }
            }
        }
        self.save_ban_record(&portal.remote_id, &record).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*", ""));
        assert!(glob("*!*@*", "nick!user@host"));
        assert!(glob("n?ck!*@*.example", "nick!u@a.b.example"));
        assert!(!glob("n?ck!*@*.example", "nck!u@a.example"));
        assert!(glob("*a*b*c", "xxaxxbxxbxc"));
        assert!(!glob("*a*b*c", "xxaxxbxxbx"));
        assert!(glob("a**?", "ab"));
        assert!(!glob("abc", "abcd"));
    }

    #[test]
    fn masks_are_normalised_and_extbans_ignored() {
        let m = |s: &str| BanMask::parse(s).map(|b| b.as_str().to_owned());
        assert_eq!(m("nick").as_deref(), Some("nick!*@*"));
        assert_eq!(m("user@host").as_deref(), Some("*!user@host"));
        assert_eq!(m("nick!user").as_deref(), Some("nick!user@*"));
        assert_eq!(m("*!*@2001:db8::1").as_deref(), Some("*!*@2001:db8::1"));
        for ext in ["~a:account", "$a:account", "R:account", "x:*", "account:bob", "m:n!*@*", ""] {
            assert_eq!(m(ext), None, "{ext}");
        }
        assert!(BanMask::parse("bob!*@*").is_some_and(|b| b.nick_only));
        assert!(BanMask::parse("bob!*@h").is_some_and(|b| !b.nick_only));
    }

    #[test]
    fn masks_match_under_the_casemapping() {
        let b = BanMask::parse("*!*Alice@*.Example").unwrap_or_else(|| unreachable!());
        assert!(b.matches(CaseMapping::Rfc1459, "alice[m]", Some("~alice@host.example")));
        assert!(!b.matches(CaseMapping::Rfc1459, "alice[m]", Some("~alice@host.example.org")));
        assert!(!b.matches(CaseMapping::Rfc1459, "alice[m]", None));
        let n = BanMask::parse("Bob[m]").unwrap_or_else(|| unreachable!());
        assert!(n.matches(CaseMapping::Rfc1459, "bob{M}", None));
        assert!(!n.matches(CaseMapping::Ascii, "bob{M}", None));
        assert!(n.matches(CaseMapping::Ascii, "BOB[m]", Some("u@h")));
        // A cloaked host is what is matched.
        let c = BanMask::parse("*!*@cloaked-*.users.test").unwrap_or_else(|| unreachable!());
        assert!(c.matches(CaseMapping::Rfc1459, "x", Some("u@cloaked-1a2b.users.test")));
        assert!(!c.matches(CaseMapping::Rfc1459, "x", Some("u@127.0.0.1")));
    }
}
