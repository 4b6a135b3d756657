-- Inbound transactions: the raw body is kept until every event in it is handled.
-- The row itself (body NULL) remains as the dedupe record until pruned.
CREATE TABLE inbound_txn (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    txn_id      TEXT NOT NULL UNIQUE,
    body        BLOB,
    received_at INTEGER NOT NULL
);
-- Events of a pending transaction that are already handled (index in the body).
CREATE TABLE inbound_done (
    txn_id TEXT NOT NULL,
    idx    INTEGER NOT NULL,
    PRIMARY KEY (txn_id, idx)
) WITHOUT ROWID;
CREATE TABLE dead_letters (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    txn_id     TEXT NOT NULL,
    idx        INTEGER NOT NULL,
    lane       TEXT NOT NULL,
    event_id   TEXT,
    event_type TEXT NOT NULL,
    payload    TEXT NOT NULL,
    error      TEXT NOT NULL,
    attempts   INTEGER NOT NULL,
    failed_at  INTEGER NOT NULL
);
CREATE TABLE portals (
    remote_id  TEXT PRIMARY KEY,
    room_id    TEXT NOT NULL UNIQUE,
    alias      TEXT,
    metadata   TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL
);
CREATE TABLE ghosts (
    remote_id   TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL UNIQUE,
    displayname TEXT,
    avatar_url  TEXT,
    metadata    TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE user_settings (
    user_id  TEXT NOT NULL,
    network  TEXT NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}',
    secret   BLOB,
    PRIMARY KEY (user_id, network)
) WITHOUT ROWID;
CREATE TABLE messages (
    room_id   TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    part      INTEGER NOT NULL DEFAULT 0,
    event_id  TEXT NOT NULL,
    sender    TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    PRIMARY KEY (room_id, remote_id, part)
) WITHOUT ROWID;
CREATE INDEX messages_by_event ON messages (room_id, event_id);
CREATE TABLE kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE registered_users (
    user_id TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE room_members (
    room_id    TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    membership TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
) WITHOUT ROWID;
CREATE TABLE power_levels (
    room_id TEXT PRIMARY KEY,
    content TEXT NOT NULL
) WITHOUT ROWID;
