//! The SQLite backend: WAL mode, numbered migrations, blocking calls on tokio's blocking pool.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex, RwLock},
};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    DeadLetter, Ghost, MessageMapping, PendingTransaction, Portal, Store, StoreError, UserSettings,
    now_ms,
};

/// The migrations, in order; `PRAGMA user_version` records how many are applied.
const MIGRATIONS: &[&str] = &[include_str!("../../migrations/001_initial.sql")];

/// A [`Store`] on one SQLite file (or in memory).
///
/// Portals and the key-value table are read for nearly every event, so they are also kept in
/// memory (loaded at open, written through): one `SqliteStore` must own its database file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    hot: Arc<RwLock<Hot>>,
}

/// The in-memory copies of the small, hot tables.
#[derive(Debug, Default)]
struct Hot {
    portals: HashMap<String, Portal>,
    room_to_remote: HashMap<String, String>,
    kv: HashMap<String, String>,
}

impl Hot {
    fn load(conn: &Connection) -> Result<Self, StoreError> {
        let mut hot = Self::default();
        let mut stmt = conn.prepare(&format!("SELECT {PORTAL_COLS} FROM portals"))?;
        for row in stmt.query_map([], row_portal)? {
            let p = to_portal(row?)?;
            hot.room_to_remote.insert(p.room_id.clone(), p.remote_id.clone());
            hot.portals.insert(p.remote_id.clone(), p);
        }
        let mut stmt = conn.prepare("SELECT key, value FROM kv")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
            let (k, v) = row?;
            hot.kv.insert(k, v);
        }
        Ok(hot)
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_owned();
        let checkpoint_path = path.clone();
        let (conn, hot) =
            tokio::task::spawn_blocking(move || -> Result<(Connection, Hot), StoreError> {
                let conn = Self::prepare(Connection::open(path)?)?;
                // Checkpoints run on a background connection (`spawn_checkpointer`), not inside
                // commits, so they never add their latency to a transaction's 200.
                conn.pragma_update(None, "wal_autocheckpoint", 0)?;
                let hot = Hot::load(&conn)?;
                Ok((conn, hot))
            })
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        let conn = Arc::new(Mutex::new(conn));
        spawn_checkpointer(checkpoint_path, Arc::downgrade(&conn));
        Ok(Self { conn, hot: Arc::new(RwLock::new(hot)) })
    }

    /// An in-memory database (for tests).
    pub async fn in_memory() -> Result<Self, StoreError> {
        let conn = Self::prepare(Connection::open_in_memory()?)?;
        let hot = Hot::load(&conn)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)), hot: Arc::new(RwLock::new(hot)) })
    }

    fn hot(&self) -> std::sync::RwLockReadGuard<'_, Hot> {
        self.hot.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn hot_mut(&self) -> std::sync::RwLockWriteGuard<'_, Hot> {
        self.hot.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn prepare(mut conn: Connection) -> Result<Connection, StoreError> {
        // WAL with synchronous=NORMAL survives a process crash (kill -9) with every committed
        // transaction intact; only a power loss can lose the last commits.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Content deleted or overwritten (a handled transaction's body, which may hold what a
        // user typed to the bot) is zeroed on the pages being written anyway, so it does not
        // linger in the database file. (FAST: no extra I/O; old WAL frames are overwritten as
        // the WAL is reused.)
        conn.pragma_update(None, "secure_delete", "FAST")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let current: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let supported = u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX);
        if current > supported {
            return Err(StoreError::TooNew { found: current, supported });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let version = u32::try_from(i + 1).unwrap_or(u32::MAX);
            let tx = conn.transaction()?;
            tx.execute_batch(sql).map_err(|source| StoreError::Migration { version, source })?;
            tx.pragma_update(None, "user_version", version)
                .map_err(|source| StoreError::Migration { version, source })?;
            tx.commit().map_err(|source| StoreError::Migration { version, source })?;
            tracing::info!(version, "applied database migration");
        }
        Ok(conn)
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

/// Every second, a PASSIVE checkpoint (never blocks readers or the writer) on a connection of
/// its own; once a checkpoint is complete SQLite reuses the WAL from its start, so it does not
/// grow without bound. Stops when the store is dropped.
fn spawn_checkpointer(path: std::path::PathBuf, store: std::sync::Weak<Mutex<Connection>>) {
    let spawned = std::thread::Builder::new().name("trestle-checkpoint".into()).spawn(move || {
        let Ok(conn) = Connection::open(&path) else { return };
        let _ = conn.busy_timeout(std::time::Duration::from_millis(100));
        while store.upgrade().is_some() {
            std::thread::sleep(std::time::Duration::from_secs(1));
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::debug!(error = %e, "WAL checkpoint skipped");
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the checkpoint thread; WAL will grow until restart");
    }
}

fn json_col(s: &str, what: &'static str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(s).map_err(|source| StoreError::Corrupt { what, source })
}

fn row_portal(
    r: &rusqlite::Row<'_>,
) -> rusqlite::Result<(String, String, Option<String>, String, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn to_portal(t: (String, String, Option<String>, String, i64)) -> Result<Portal, StoreError> {
    Ok(Portal {
        remote_id: t.0,
        room_id: t.1,
        alias: t.2,
        metadata: json_col(&t.3, "portals.metadata")?,
        created_at: t.4,
    })
}

type GhostRow = (String, String, Option<String>, Option<String>, String);

fn row_ghost(r: &rusqlite::Row<'_>) -> rusqlite::Result<GhostRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn to_ghost(t: GhostRow) -> Result<Ghost, StoreError> {
    Ok(Ghost {
        remote_id: t.0,
        user_id: t.1,
        displayname: t.2,
        avatar_url: t.3,
        metadata: json_col(&t.4, "ghosts.metadata")?,
    })
}

fn row_mapping(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageMapping> {
    Ok(MessageMapping {
        room_id: r.get(0)?,
        remote_id: r.get(1)?,
        part: r.get(2)?,
        event_id: r.get(3)?,
        sender: r.get(4)?,
        timestamp: r.get(5)?,
    })
}

const PORTAL_COLS: &str = "remote_id, room_id, alias, metadata, created_at";
const GHOST_COLS: &str = "remote_id, user_id, displayname, avatar_url, metadata";
const MSG_COLS: &str = "room_id, remote_id, part, event_id, sender, timestamp";

#[async_trait]
impl Store for SqliteStore {
    async fn insert_transaction(&self, txn_id: &str, body: Bytes) -> Result<bool, StoreError> {
        let txn_id = txn_id.to_owned();
        self.call(move |c| {
            let n = c
                .prepare_cached(
                    "INSERT INTO inbound_txn (txn_id, body, received_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (txn_id) DO NOTHING",
                )?
                .execute(params![txn_id, &body[..], now_ms()])?;
            Ok(n == 1)
        })
        .await
    }

    async fn pending_transactions(&self) -> Result<Vec<PendingTransaction>, StoreError> {
        self.call(|c| {
            let mut stmt = c.prepare(
                "SELECT txn_id, body FROM inbound_txn WHERE body IS NOT NULL ORDER BY seq",
            )?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut done_stmt = c.prepare("SELECT idx FROM inbound_done WHERE txn_id = ?1")?;
            let mut out = Vec::with_capacity(rows.len());
            for (txn_id, body) in rows {
                let done = done_stmt
                    .query_map([&txn_id], |r| r.get::<_, u32>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                out.push(PendingTransaction { txn_id, body: Bytes::from(body), done });
            }
            Ok(out)
        })
        .await
    }

    async fn mark_done(&self, events: &[(String, u32)]) -> Result<(), StoreError> {
        let events = events.to_vec();
        self.call(move |c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT OR IGNORE INTO inbound_done (txn_id, idx) VALUES (?1, ?2)",
                )?;
                for (t, i) in &events {
                    stmt.execute(params![t, i])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn complete_transaction(&self, txn_id: &str) -> Result<(), StoreError> {
        let txn_id = txn_id.to_owned();
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute("UPDATE inbound_txn SET body = NULL WHERE txn_id = ?1", [&txn_id])?;
            tx.execute("DELETE FROM inbound_done WHERE txn_id = ?1", [&txn_id])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn prune_transactions(&self, before_ms: i64, keep: u32) -> Result<usize, StoreError> {
        self.call(move |c| {
            Ok(c.execute(
                "DELETE FROM inbound_txn WHERE body IS NULL AND received_at < ?1
                 AND seq < (SELECT COALESCE(MIN(seq), 0) FROM
                            (SELECT seq FROM inbound_txn ORDER BY seq DESC LIMIT ?2))",
                params![before_ms, keep],
            )?)
        })
        .await
    }

    async fn add_dead_letter(&self, l: &DeadLetter) -> Result<(), StoreError> {
        let l = l.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO dead_letters (txn_id, idx, lane, event_id, event_type, payload,
                 error, attempts, failed_at) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
                params![
                    l.txn_id,
                    l.idx,
                    l.lane,
                    l.event_id,
                    l.event_type,
                    l.payload,
                    l.error,
                    l.attempts,
                    l.failed_at
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, StoreError> {
        self.call(move |c| {
            let mut stmt = c.prepare(
                "SELECT txn_id, idx, lane, event_id, event_type, payload, error, attempts,
                 failed_at FROM dead_letters ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = stmt
                .query_map([limit], |r| {
                    Ok(DeadLetter {
                        txn_id: r.get(0)?,
                        idx: r.get(1)?,
                        lane: r.get(2)?,
                        event_id: r.get(3)?,
                        event_type: r.get(4)?,
                        payload: r.get(5)?,
                        error: r.get(6)?,
                        attempts: r.get(7)?,
                        failed_at: r.get(8)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn upsert_portal(&self, p: &Portal) -> Result<(), StoreError> {
        let cached = p.clone();
        let p = p.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO portals (remote_id, room_id, alias, metadata, created_at)
                 VALUES (?1,?2,?3,?4,?5)
                 ON CONFLICT (remote_id) DO UPDATE SET room_id = excluded.room_id,
                 alias = excluded.alias, metadata = excluded.metadata",
                params![p.remote_id, p.room_id, p.alias, p.metadata.to_string(), p.created_at],
            )?;
            Ok(())
        })
        .await?;
        let mut hot = self.hot_mut();
        // Keep the original creation time, as the row does.
        let created_at =
            hot.portals.get(&cached.remote_id).map_or(cached.created_at, |o| o.created_at);
        if let Some(old) = hot.portals.get(&cached.remote_id) {
            let old_room = old.room_id.clone();
            hot.room_to_remote.remove(&old_room);
        }
        hot.room_to_remote.insert(cached.room_id.clone(), cached.remote_id.clone());
        hot.portals.insert(cached.remote_id.clone(), Portal { created_at, ..cached });
        Ok(())
    }

    async fn portal_by_remote(&self, remote_id: &str) -> Result<Option<Portal>, StoreError> {
        Ok(self.hot().portals.get(remote_id).cloned())
    }

    async fn portal_by_room(&self, room_id: &str) -> Result<Option<Portal>, StoreError> {
        let hot = self.hot();
        Ok(hot.room_to_remote.get(room_id).and_then(|r| hot.portals.get(r)).cloned())
    }

    async fn delete_portal(&self, remote_id: &str) -> Result<(), StoreError> {
        let k = remote_id.to_owned();
        self.call(move |c| {
            c.execute("DELETE FROM portals WHERE remote_id = ?1", [k])?;
            Ok(())
        })
        .await?;
        let mut hot = self.hot_mut();
        if let Some(p) = hot.portals.remove(remote_id) {
            hot.room_to_remote.remove(&p.room_id);
        }
        Ok(())
    }

    async fn portals(&self) -> Result<Vec<Portal>, StoreError> {
        self.call(|c| {
            let mut stmt =
                c.prepare(&format!("SELECT {PORTAL_COLS} FROM portals ORDER BY created_at"))?;
            let rows = stmt.query_map([], row_portal)?.collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().map(to_portal).collect()
        })
        .await
    }

    async fn upsert_ghost(&self, g: &Ghost) -> Result<(), StoreError> {
        let g = g.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO ghosts (remote_id, user_id, displayname, avatar_url, metadata)
                 VALUES (?1,?2,?3,?4,?5)
                 ON CONFLICT (remote_id) DO UPDATE SET user_id = excluded.user_id,
                 displayname = excluded.displayname, avatar_url = excluded.avatar_url,
                 metadata = excluded.metadata",
                params![
                    g.remote_id,
                    g.user_id,
                    g.displayname,
                    g.avatar_url,
                    g.metadata.to_string()
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn ghost_by_remote(&self, remote_id: &str) -> Result<Option<Ghost>, StoreError> {
        let k = remote_id.to_owned();
        self.call(move |c| {
            c.query_row(
                &format!("SELECT {GHOST_COLS} FROM ghosts WHERE remote_id = ?1"),
                [k],
                row_ghost,
            )
            .optional()?
            .map(to_ghost)
            .transpose()
        })
        .await
    }

    async fn ghost_by_user(&self, user_id: &str) -> Result<Option<Ghost>, StoreError> {
        let k = user_id.to_owned();
        self.call(move |c| {
            c.query_row(
                &format!("SELECT {GHOST_COLS} FROM ghosts WHERE user_id = ?1"),
                [k],
                row_ghost,
            )
            .optional()?
            .map(to_ghost)
            .transpose()
        })
        .await
    }

    async fn user_settings(
        &self,
        user_id: &str,
        network: &str,
    ) -> Result<Option<UserSettings>, StoreError> {
        let (u, n) = (user_id.to_owned(), network.to_owned());
        self.call(move |c| {
            let row = c
                .query_row(
                    "SELECT settings, secret FROM user_settings WHERE user_id = ?1 AND network = ?2",
                    params![u, n],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<Vec<u8>>>(1)?)),
                )
                .optional()?;
            row.map(|(s, secret)| {
                Ok(UserSettings {
                    user_id: u,
                    network: n,
                    settings: json_col(&s, "user_settings.settings")?,
                    secret,
                })
            })
            .transpose()
        })
        .await
    }

    async fn set_user_settings(&self, s: &UserSettings) -> Result<(), StoreError> {
        let s = s.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO user_settings (user_id, network, settings, secret) VALUES (?1,?2,?3,?4)
                 ON CONFLICT (user_id, network) DO UPDATE SET settings = excluded.settings,
                 secret = excluded.secret",
                params![s.user_id, s.network, s.settings.to_string(), s.secret],
            )?;
            Ok(())
        })
        .await
    }

    async fn delete_user_settings(&self, user_id: &str, network: &str) -> Result<(), StoreError> {
        let (u, n) = (user_id.to_owned(), network.to_owned());
        self.call(move |c| {
            c.execute(
                "DELETE FROM user_settings WHERE user_id = ?1 AND network = ?2",
                params![u, n],
            )?;
            Ok(())
        })
        .await
    }

    async fn users_with_settings(&self, network: &str) -> Result<Vec<UserSettings>, StoreError> {
        let n = network.to_owned();
        self.call(move |c| {
            let mut stmt = c.prepare(
                "SELECT user_id, settings, secret FROM user_settings WHERE network = ?1
                 ORDER BY user_id",
            )?;
            let rows = stmt
                .query_map([&n], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
                })?
                .collect::<Result<Vec<(String, String, Option<Vec<u8>>)>, _>>()?;
            rows.into_iter()
                .map(|(user_id, s, secret)| {
                    Ok(UserSettings {
                        user_id,
                        network: n.clone(),
                        settings: json_col(&s, "user_settings.settings")?,
                        secret,
                    })
                })
                .collect()
        })
        .await
    }

    async fn insert_message(&self, m: &MessageMapping) -> Result<(), StoreError> {
        let m = m.clone();
        self.call(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO messages (room_id, remote_id, part, event_id, sender,
                 timestamp) VALUES (?1,?2,?3,?4,?5,?6)",
                params![m.room_id, m.remote_id, m.part, m.event_id, m.sender, m.timestamp],
            )?;
            Ok(())
        })
        .await
    }

    async fn messages_by_remote(
        &self,
        room_id: &str,
        remote_id: &str,
    ) -> Result<Vec<MessageMapping>, StoreError> {
        let (r, m) = (room_id.to_owned(), remote_id.to_owned());
        self.call(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {MSG_COLS} FROM messages WHERE room_id = ?1 AND remote_id = ?2 ORDER BY part"
            ))?;
            Ok(stmt.query_map(params![r, m], row_mapping)?.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn message_by_event(
        &self,
        room_id: &str,
        event_id: &str,
    ) -> Result<Option<MessageMapping>, StoreError> {
        let (r, e) = (room_id.to_owned(), event_id.to_owned());
        self.call(move |c| {
            Ok(c.query_row(
                &format!(
                    "SELECT {MSG_COLS} FROM messages WHERE room_id = ?1 AND event_id = ?2 LIMIT 1"
                ),
                params![r, e],
                row_mapping,
            )
            .optional()?)
        })
        .await
    }

    async fn messages_by_event(
        &self,
        room_id: &str,
        event_id: &str,
    ) -> Result<Vec<MessageMapping>, StoreError> {
        let (r, e) = (room_id.to_owned(), event_id.to_owned());
        self.call(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {MSG_COLS} FROM messages WHERE room_id = ?1 AND event_id = ?2 ORDER BY part"
            ))?;
            Ok(stmt.query_map(params![r, e], row_mapping)?.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn delete_messages(&self, room_id: &str, remote_id: &str) -> Result<(), StoreError> {
        let (r, m) = (room_id.to_owned(), remote_id.to_owned());
        self.call(move |c| {
            c.execute("DELETE FROM messages WHERE room_id = ?1 AND remote_id = ?2", params![r, m])?;
            Ok(())
        })
        .await
    }

    async fn kv_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.hot().kv.get(key).cloned())
    }

    async fn kv_set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let (k, v) = (key.to_owned(), value.to_owned());
        self.call(move |c| {
            c.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?1, ?2)", params![k, v])?;
            Ok(())
        })
        .await?;
        self.hot_mut().kv.insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    async fn kv_delete(&self, key: &str) -> Result<(), StoreError> {
        let k = key.to_owned();
        self.call(move |c| {
            c.execute("DELETE FROM kv WHERE key = ?1", [k])?;
            Ok(())
        })
        .await?;
        self.hot_mut().kv.remove(key);
        Ok(())
    }

    async fn is_registered(&self, user_id: &str) -> Result<bool, StoreError> {
        let k = user_id.to_owned();
        self.call(move |c| {
            Ok(c.query_row("SELECT 1 FROM registered_users WHERE user_id = ?1", [k], |_| Ok(()))
                .optional()?
                .is_some())
        })
        .await
    }

    async fn mark_registered(&self, user_id: &str) -> Result<(), StoreError> {
        let k = user_id.to_owned();
        self.call(move |c| {
            c.execute("INSERT OR IGNORE INTO registered_users (user_id) VALUES (?1)", [k])?;
            Ok(())
        })
        .await
    }

    async fn membership(&self, room_id: &str, user_id: &str) -> Result<Option<String>, StoreError> {
        let (r, u) = (room_id.to_owned(), user_id.to_owned());
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT membership FROM room_members WHERE room_id = ?1 AND user_id = ?2",
                params![r, u],
                |r| r.get(0),
            )
            .optional()?)
        })
        .await
    }

    async fn set_membership(
        &self,
        room_id: &str,
        user_id: &str,
        membership: &str,
    ) -> Result<(), StoreError> {
        let (r, u, m) = (room_id.to_owned(), user_id.to_owned(), membership.to_owned());
        self.call(move |c| {
            c.prepare_cached(
                "INSERT OR REPLACE INTO room_members (room_id, user_id, membership) VALUES (?1,?2,?3)",
            )?
            .execute(params![r, u, m])?;
            Ok(())
        })
        .await
    }

    async fn members(&self, room_id: &str, membership: &str) -> Result<Vec<String>, StoreError> {
        let (r, m) = (room_id.to_owned(), membership.to_owned());
        self.call(move |c| {
            let mut stmt = c.prepare(
                "SELECT user_id FROM room_members WHERE room_id = ?1 AND membership = ?2
                 ORDER BY user_id",
            )?;
            Ok(stmt.query_map(params![r, m], |r| r.get(0))?.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn power_levels(&self, room_id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let r = room_id.to_owned();
        self.call(move |c| {
            c.query_row("SELECT content FROM power_levels WHERE room_id = ?1", [r], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            .map(|s| json_col(&s, "power_levels.content"))
            .transpose()
        })
        .await
    }

    async fn set_power_levels(
        &self,
        room_id: &str,
        content: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let (r, v) = (room_id.to_owned(), content.to_string());
        self.call(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO power_levels (room_id, content) VALUES (?1, ?2)",
                params![r, v],
            )?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::store_conformance_tests!(SqliteStore::in_memory().await.unwrap());

    #[tokio::test]
    async fn file_store_survives_reopen_and_migrates_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let s = SqliteStore::open(&path).await.unwrap();
            assert!(s.insert_transaction("1", Bytes::from_static(b"{}")).await.unwrap());
        }
        let s = SqliteStore::open(&path).await.unwrap();
        assert!(!s.insert_transaction("1", Bytes::from_static(b"{}")).await.unwrap());
        assert_eq!(s.pending_transactions().await.unwrap().len(), 1);
        // The in-memory copies of portals and kv are loaded from the file.
        let p = Portal {
            remote_id: "r".into(),
            room_id: "!x".into(),
            alias: None,
            metadata: serde_json::json!({}),
            created_at: 3,
        };
        s.upsert_portal(&p).await.unwrap();
        s.kv_set("k", "v").await.unwrap();
        drop(s);
        let s = SqliteStore::open(&path).await.unwrap();
        assert_eq!(s.portal_by_room("!x").await.unwrap(), Some(p.clone()));
        assert_eq!(s.kv_get("k").await.unwrap().as_deref(), Some("v"));
        // Moving a portal to another room updates both indexes.
        s.upsert_portal(&Portal { room_id: "!y".into(), created_at: 9, ..p }).await.unwrap();
        assert_eq!(s.portal_by_room("!x").await.unwrap(), None);
        assert_eq!(s.portal_by_room("!y").await.unwrap().unwrap().created_at, 3);
    }
}
