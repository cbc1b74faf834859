#![doc = include_str!("../README.md")]
#![deny(rustdoc::broken_intra_doc_links)]

mod pg_cluster;
mod pki;

pub use pg_cluster::Cluster;
pub use pki::TestPki;

use tokio::sync::OnceCell;

/// The environment variable that points the tests at an existing PostgreSQL database.
pub const PG_URL_VAR: &str = "BACKPLANE_TEST_PG_URL";

/// The cluster shared by every test of this process that needs no server of its own.
static SHARED: OnceCell<Result<Cluster, String>> = OnceCell::const_new();

/// Starts a throwaway cluster of its own for the caller, off the async threads.
///
/// # Errors
///
/// No PostgreSQL server binaries, or a cluster that would not start.
pub async fn start_cluster() -> Result<Cluster, String> {
    tokio::task::spawn_blocking(Cluster::start)
        .await
        .map_err(|e| format!("starting PostgreSQL panicked: {e}"))?
}

/// The PostgreSQL database the tests use: `BACKPLANE_TEST_PG_URL` when set, otherwise the
/// cluster this process shares, started on first use and removed when the process exits.
///
/// # Errors
///
/// No URL is set and no cluster could be started.
pub async fn postgres_url() -> Result<String, String> {
    if let Some(url) = std::env::var(PG_URL_VAR)
        .ok()
        .filter(|url| !url.trim().is_empty())
    {
        return Ok(url);
    }
    let cluster = SHARED
        .get_or_init(|| async {
            let cluster = start_cluster().await?;
            cluster.remove_at_exit();
            Ok(cluster)
        })
        .await;
    match cluster {
        Ok(cluster) => Ok(cluster.url()),
        Err(err) => Err(format!("no PostgreSQL for the tests: {err}")),
    }
}

/// [`postgres_url`] with its own `schema`, for a test that needs a database of its own.
///
/// # Errors
///
/// As [`postgres_url`].
pub async fn test_database_url(schema: &str) -> Result<String, String> {
    let base = postgres_url().await?;
    let separator = if base.contains('?') { '&' } else { '?' };
    Ok(format!("{base}{separator}schema={schema}"))
}
