CREATE TABLE IF NOT EXISTS syncs (
    sync_id         TEXT PRIMARY KEY,
    shape           TEXT,
    body_hash       BLOB,
    generation      INTEGER NOT NULL DEFAULT 0,
    baselined       INTEGER NOT NULL DEFAULT 0,
    record_count    INTEGER NOT NULL DEFAULT 0,
    last_run_at     REAL,
    last_outcome    TEXT,
    last_error      TEXT,
    last_success_at REAL,
    last_change_at  REAL,
    next_run_at     REAL
);
CREATE TABLE IF NOT EXISTS records (
    sync_id     TEXT NOT NULL,
    record_id   TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    PRIMARY KEY (sync_id, record_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id        TEXT NOT NULL,
    sync_id       TEXT NOT NULL,
    started_at    REAL NOT NULL,
    finished_at   REAL NOT NULL,
    outcome       TEXT NOT NULL,
    sync_type     TEXT,
    error         TEXT,
    records       INTEGER,
    new           INTEGER NOT NULL DEFAULT 0,
    modified      INTEGER NOT NULL DEFAULT 0,
    deleted       INTEGER NOT NULL DEFAULT 0,
    invalid_ids   INTEGER NOT NULL DEFAULT 0,
    duplicate_ids INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_sync ON runs (sync_id, seq);
CREATE TABLE IF NOT EXISTS outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL UNIQUE,
    sync_id         TEXT NOT NULL,
    record_id       TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    webhook_url     TEXT NOT NULL,
    created_at      REAL NOT NULL,
    body            BLOB NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_status     INTEGER,
    last_error      TEXT,
    dead_at         REAL
);
CREATE INDEX IF NOT EXISTS outbox_by_record ON outbox (sync_id, record_id, seq);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at, seq) WHERE dead_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_due_by_sync ON outbox (sync_id, next_attempt_at, seq) WHERE dead_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_dead ON outbox (dead_at) WHERE dead_at IS NOT NULL;
