//! A write transaction on SQLite's one writer connection that never leaves it dirty.
//!
//! After `SQLITE_FULL` or `SQLITE_IOERR` SQLite may or may not have rolled the transaction
//! back itself ("it is recommended that applications respond to the errors listed above by
//! explicitly issuing a ROLLBACK command", sqlite.org/lang_transaction.html). sqlx's own
//! `Transaction` then loses count of it: its `ROLLBACK` fails, it believes a transaction is still
//! open, and every later `begin()` becomes a `SAVEPOINT` inside a transaction that is never
//! committed — commits that "succeed" while nothing reaches the file. So this transaction is
//! begun and ended with plain statements, and any way out other than a successful `COMMIT`
//! (an error, a cancelled future, a failed commit) closes the connection: closing rolls back
//! whatever SQLite still holds, and the pool opens a clean connection for the next writer.

use std::ops::{Deref, DerefMut};

use sqlx::pool::PoolConnection;
use sqlx::{Sqlite, SqliteConnection, SqlitePool};

use super::{StoreError, WriteHealth};

/// An open write transaction (`BEGIN IMMEDIATE`: the write lock is taken at once, so a
/// statement inside never fails to upgrade a read lock under another process's write).
pub(super) struct WriteTx {
    conn: PoolConnection<Sqlite>,
    health: WriteHealth,
    committed: bool,
    /// The commit's own error is already in `health`; drop adds nothing vaguer.
    failure_recorded: bool,
}

impl WriteTx {
    /// Begins a write transaction on the writer pool.
    pub(super) async fn begin(
        writer: &SqlitePool,
        health: &WriteHealth,
    ) -> Result<Self, StoreError> {
        let mut conn = writer.acquire().await?;
        if let Err(err) = sqlx::query("begin immediate").execute(&mut *conn).await {
            health.failed(&err.to_string());
            conn.close_on_drop();
            return Err(err.into());
        }
        Ok(Self {
            conn,
            health: health.clone(),
            committed: false,
            failure_recorded: false,
        })
    }

    /// Commits. On failure the connection is closed (rolling back what is left) and the
    /// error returned: the caller must not acknowledge anything written in it.
    pub(super) async fn commit(mut self) -> Result<(), StoreError> {
        match sqlx::query("commit").execute(&mut *self.conn).await {
            Ok(_) => {
                self.committed = true;
                self.health.succeeded();
                Ok(())
            }
            Err(err) => {
                self.health.failed(&format!("commit failed: {err}"));
                self.failure_recorded = true;
                Err(err.into())
            }
        }
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if !self.committed {
            // A statement or the commit failed, or the future was dropped: whatever state
            // SQLite left the transaction in, a closed connection holds none of it.
            if !self.failure_recorded {
                self.health
                    .failed("a write transaction failed before its commit");
            }
            self.conn.close_on_drop();
        }
    }
}

impl Deref for WriteTx {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.conn
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }
}
