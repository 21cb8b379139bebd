//! The storage layer's one error type.

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configured backend is not available in this build.
    #[error("{0}")]
    Unsupported(String),
    /// The storage settings are wrong (a malformed URL, an invalid schema name).
    #[error("invalid storage configuration: {0}")]
    InvalidConfig(String),
    /// The database could not be reached or is overloaded; the caller may retry.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The database answers reads, but write transactions do not commit (a full disk, a
    /// read-only file, a broken writer connection).
    #[error("storage writes are failing: {0}")]
    WritesFailing(String),
    /// Anything else from the driver.
    #[error("storage error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}
