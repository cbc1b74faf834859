//! Connection and schema settings.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use backplane_core::schema::TableSlug;
use backplane_core::{DEFAULT_STREAMS, Driver as _, Error};

use crate::PgBackplane;
use crate::tls::{self, RootCerts, SslMode};

/// Settings of a [`PgBackplane`]: where the database is, which schema and tables to use, and
/// how to batch. Each setter states its default.
///
/// # Examples
///
/// ```
/// use backplane_postgres::PgOptions;
///
/// let options: PgOptions = "postgres://app:secret@db.internal:5432/chat?schema=rt&streams=8"
///     .parse()?;
/// assert_eq!(options.get_schema(), "rt");
/// assert!(!format!("{options:?}").contains("secret"));
/// # Ok::<(), backplane_core::Error>(())
/// ```
#[derive(Clone)]
pub struct PgOptions {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) schema: String,
    pub(crate) table_prefix: String,
    pub(crate) streams: u32,
    pub(crate) pool_size: usize,
    pub(crate) batch_delay: Duration,
    pub(crate) max_batch: usize,
    pub(crate) create_schema: bool,
    pub(crate) tables_per_hub: bool,
    pub(crate) table_slug: Option<TableSlug>,
    pub(crate) listener_check: Duration,
    pub(crate) statement_timeout: Duration,
    pub(crate) ssl_mode: SslMode,
    pub(crate) root_certs: Option<RootCerts>,
}

impl fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgOptions")
            .field("hosts", &self.config.get_hosts())
            .field("ports", &self.config.get_ports())
            .field("user", &self.config.get_user())
            .field("dbname", &self.config.get_dbname())
            .field(
                "password",
                &self.config.get_password().map(|_| "<redacted>"),
            )
            .field("schema", &self.schema)
            .field("table_prefix", &self.table_prefix)
            .field("streams", &self.streams)
            .field("pool_size", &self.pool_size)
            .field("batch_delay", &self.batch_delay)
            .field("create_schema", &self.create_schema)
            .field("tables_per_hub", &self.tables_per_hub)
            .field("table_slug", &self.table_slug)
            .field("ssl_mode", &self.ssl_mode)
            .field("root_certs", &self.root_certs)
            .finish_non_exhaustive()
    }
}

/// Query parameters that belong to the backplane, not to the PostgreSQL connection.
const OWN_PARAMS: &[&str] = &[
    "schema",
    "table_prefix",
    "streams",
    "pool_size",
    "batch_delay_ms",
    "sslmode",
    "sslrootcert",
    "create_schema",
    "tables_per_hub",
];

/// A boolean query parameter: `true`, `1` or `yes`; `false`, `0` or `no`.
fn boolean(key: &str, value: &str) -> Result<bool, Error> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(bad(format!("{key} must be true or false, not {other:?}"))),
    }
}

fn bad(reason: impl Into<String>) -> Error {
    Error::permanent(
        PgBackplane::NAME,
        format!("invalid options: {}", reason.into()),
    )
}

impl PgOptions {
    /// Options for a parsed connection configuration, with every other setting at its default.
    pub fn from_config(config: tokio_postgres::Config) -> Self {
        Self {
            config,
            schema: "backplane".to_owned(),
            table_prefix: String::new(),
            streams: DEFAULT_STREAMS,
            pool_size: 16,
            batch_delay: Duration::from_millis(1),
            max_batch: 1000,
            create_schema: true,
            tables_per_hub: false,
            table_slug: None,
            listener_check: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            ssl_mode: SslMode::default(),
            root_certs: None,
        }
    }

    /// How the connection is encrypted and the server checked, as libpq's `sslmode`. Defaults
    /// to [`SslMode::Prefer`].
    pub fn ssl_mode(mut self, mode: SslMode) -> Self {
        self.ssl_mode = mode;
        self
    }

    /// The trusted roots for `verify-ca` and `verify-full`, as libpq's `sslrootcert` (a PEM
    /// file, or [`RootCerts::System`]). Defaults to the system's store.
    pub fn root_certs(mut self, roots: RootCerts) -> Self {
        self.root_certs = Some(roots);
        self
    }

    /// The connection configuration with the TLS mode applied, and its TLS connector.
    pub(crate) fn connect_parts(
        &self,
    ) -> Result<
        (
            tokio_postgres::Config,
            tokio_postgres_rustls::MakeRustlsConnect,
        ),
        Error,
    > {
        let mut config = self.config.clone();
        config.ssl_mode(tls::postgres_mode(self.ssl_mode));
        Ok((
            config,
            tls::connector(self.ssl_mode, self.root_certs.as_ref())?,
        ))
    }

    /// The schema that holds the tables. Defaults to `backplane`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// A prefix for every table name, so several deployments can share one schema. Defaults to
    /// none.
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.table_prefix = prefix.into();
        self
    }

    /// Streams per hub; every node of a deployment must use the same count. Defaults to 4.
    pub fn streams(mut self, streams: u32) -> Self {
        self.streams = streams.max(1);
        self
    }

    /// Connections in the pool. Defaults to 16.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// How long a batch (one multi-row insert, one NOTIFY) waits for more appends under load;
    /// an append on an idle stream is written at once. Zero turns batching off: every append is
    /// its own statement. Defaults to 1 ms.
    pub fn batch_delay(mut self, delay: Duration) -> Self {
        self.batch_delay = delay;
        self
    }

    /// The most records written by one batch. Defaults to 1000.
    pub fn max_batch(mut self, records: usize) -> Self {
        self.max_batch = records.max(1);
        self
    }

    /// Whether to create and migrate the schema on connect. When `false`, the schema must
    /// exist already (see [`PgBackplane::ddl`]). Defaults to `true`.
    pub fn create_schema(mut self, create: bool) -> Self {
        self.create_schema = create;
        self
    }

    /// Whether every hub gets a table set of its own (streams, log, connections, memberships,
    /// sessions, messages and attempts, named `{prefix}{slug}_streams` and so on), created on the
    /// hub's first use, instead of one table set shared by all hubs. The slug comes from the hub
    /// name (see [`table_slug`](Self::table_slug)); the nodes table, the migrations table and a
    /// registry of hubs stay shared. Every node of a deployment must use the same setting.
    /// Setting it to `false` also drops a custom slug function. Defaults to `false`.
    pub fn tables_per_hub(mut self, per_hub: bool) -> Self {
        self.tables_per_hub = per_hub;
        if !per_hub {
            self.table_slug = None;
        }
        self
    }

    /// A custom slug for a hub's tables, in place of the default; implies
    /// [`tables_per_hub`](Self::tables_per_hub). The function must give every hub the same slug
    /// on every node and different hubs different slugs; the slug is quoted, so any text
    /// without control characters works, as long as the longest table name,
    /// `{prefix}{slug}_memberships`, fits PostgreSQL's 63 bytes. An empty or too long slug,
    /// or one another hub already has, fails the hub's first use with a
    /// [`PgTableSetError`](crate::PgTableSetError).
    ///
    /// The default slug is the hub name lowercased, every character other than `a`-`z`, `0`-`9`
    /// and `_` replaced by `_`, cut to 22 bytes, then `_` and 8 hex digits of a hash of the
    /// exact name: `Chat` gives `chat_` followed by its hash, and differs from `chat`'s.
    ///
    /// # Examples
    ///
    /// ```
    /// use backplane_postgres::PgOptions;
    ///
    /// let options: PgOptions = "postgres://app@db.internal/chat".parse()?;
    /// let options = options.table_slug(|hub| format!("h_{}", hub.to_lowercase()));
    /// assert!(options.get_tables_per_hub());
    /// # Ok::<(), backplane_core::Error>(())
    /// ```
    pub fn table_slug(mut self, slug: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.table_slug = Some(TableSlug::new(slug));
        self.tables_per_hub = true;
        self
    }

    /// How often the listener connection is checked with a round trip, so a dead listener is
    /// noticed without waiting for TCP. Defaults to 5 seconds.
    pub fn listener_check(mut self, interval: Duration) -> Self {
        self.listener_check = interval;
        self
    }

    /// How long one statement may run before it fails. Defaults to 30 seconds.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// The schema name.
    pub fn get_schema(&self) -> &str {
        &self.schema
    }

    /// The table prefix.
    pub fn get_table_prefix(&self) -> &str {
        &self.table_prefix
    }

    /// Whether every hub has a table set of its own.
    pub fn get_tables_per_hub(&self) -> bool {
        self.tables_per_hub
    }

    /// The connection configuration.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.schema.is_empty() || self.schema.len() > 40 {
            return Err(bad("the schema name must be 1 to 40 bytes long"));
        }
        if self.table_prefix.len() > 20 {
            return Err(bad("the table prefix must be at most 20 bytes long"));
        }
        for (what, value) in [
            ("schema name", &self.schema),
            ("table prefix", &self.table_prefix),
        ] {
            if value.chars().any(|c| c.is_control() || c == '"') {
                return Err(bad(format!(
                    "the {what} must not contain quotes or control characters"
                )));
            }
        }
        Ok(())
    }
}

impl FromStr for PgOptions {
    type Err = Error;

    /// Parses a `postgres://` or `postgresql://` URL (or a `key=value` connection string).
    /// The query parameters `schema`, `table_prefix`, `streams`, `pool_size`,
    /// `batch_delay_ms`, `create_schema` and `tables_per_hub` (`true` or `false`), `sslmode` (`disable`, `prefer`,
    /// `require`, `verify-ca`, `verify-full`) and `sslrootcert` (a PEM file, or `system`) set the
    /// backplane's options; the others go to PostgreSQL.
    fn from_str(url: &str) -> Result<Self, Error> {
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, query),
            None => (url, ""),
        };
        let mut own = Vec::new();
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if OWN_PARAMS.contains(&key) {
                let value = percent_encoding::percent_decode_str(value)
                    .decode_utf8()
                    .map_err(|_| bad(format!("{key} is not valid UTF-8 once decoded")))?;
                own.push((key, value.into_owned()));
            } else {
                rest.push(pair);
            }
        }
        let pg_url = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        // The connection string itself is never echoed: it may hold a password.
        let config = tokio_postgres::Config::from_str(&pg_url)
            .map_err(|e| bad(format!("could not parse the connection URL: {e}")))?;
        let mut options = Self::from_config(config);
        for (key, value) in &own {
            let (key, value) = (*key, value.as_str());
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| bad(format!("{key} must be a number, not {value:?}")))
            };
            options = match key {
                "schema" => options.schema(value),
                "table_prefix" => options.table_prefix(value),
                "streams" => options
                    .streams(u32::try_from(number()?).map_err(|_| bad("streams is too large"))?),
                "pool_size" => options.pool_size(
                    usize::try_from(number()?).map_err(|_| bad("pool_size is too large"))?,
                ),
                "sslmode" => options.ssl_mode(value.parse()?),
                "create_schema" => options.create_schema(boolean(key, value)?),
                "tables_per_hub" => options.tables_per_hub(boolean(key, value)?),
                "sslrootcert" => options.root_certs(if value == "system" {
                    RootCerts::System
                } else {
                    RootCerts::File(value.into())
                }),
                _ => options.batch_delay(Duration::from_millis(number()?)),
            };
        }
        options.validate()?;
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_own_params_and_passes_the_rest() {
        let o: PgOptions =
            "postgres://u:pw@h:5433/db?schema=s1&connect_timeout=5&streams=8&table_prefix=t_"
                .parse()
                .unwrap();
        assert_eq!(o.schema, "s1");
        assert_eq!(o.table_prefix, "t_");
        assert_eq!(o.streams, 8);
        assert_eq!(
            o.config.get_connect_timeout(),
            Some(&Duration::from_secs(5))
        );
        assert_eq!(o.config.get_ports(), &[5433]);
        let o: PgOptions = "postgres://h/db?schema=Mixed%20Case".parse().unwrap();
        assert_eq!(o.schema, "Mixed Case");
    }

    #[test]
    fn tls_params_are_ours() {
        let o: PgOptions = "postgres://h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem"
            .parse()
            .unwrap();
        assert_eq!(o.ssl_mode, SslMode::VerifyFull);
        assert_eq!(o.root_certs, Some(RootCerts::File("/etc/ca.pem".into())));
        let o: PgOptions = "postgres://h/db?sslmode=require&sslrootcert=system"
            .parse()
            .unwrap();
        assert_eq!(o.ssl_mode, SslMode::Require);
        assert_eq!(o.root_certs, Some(RootCerts::System));
        assert!(
            "postgres://h/db?sslmode=sometimes"
                .parse::<PgOptions>()
                .is_err()
        );
    }

    #[test]
    fn password_never_printed() {
        let o: PgOptions = "postgres://u:hunter2@h/db".parse().unwrap();
        assert!(!format!("{o:?}").contains("hunter2"));
        let err = "postgres://u:hunter2@h/db?streams=x"
            .parse::<PgOptions>()
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(err.to_string().contains("streams"), "{err}");
    }

    #[test]
    fn bad_names_rejected() {
        assert!("postgres://h/db?schema=a%22b".parse::<PgOptions>().is_err());
        assert!(
            PgOptions::from_config(tokio_postgres::Config::new())
                .schema("a\"b")
                .validate()
                .is_err()
        );
        assert!(
            PgOptions::from_config(tokio_postgres::Config::new())
                .schema("")
                .validate()
                .is_err()
        );
    }

    #[test]
    fn tables_per_hub_parses_and_is_checked() {
        let o: PgOptions = "postgres://h/db".parse().unwrap();
        assert!(!o.get_tables_per_hub());
        for yes in ["true", "1", "yes"] {
            let o: PgOptions = format!("postgres://h/db?tables_per_hub={yes}")
                .parse()
                .unwrap();
            assert!(o.get_tables_per_hub(), "{yes}");
        }
        for no in ["false", "0", "no"] {
            let o: PgOptions = format!("postgres://h/db?tables_per_hub={no}")
                .parse()
                .unwrap();
            assert!(!o.get_tables_per_hub(), "{no}");
        }
        for bad in [
            "tables_per_hub=maybe",
            "tables_per_hub=",
            "tables_per_hub=TRUE",
        ] {
            let err = format!("postgres://u:hunter2@h/db?{bad}")
                .parse::<PgOptions>()
                .unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("tables_per_hub must be true or false"),
                "{text}"
            );
            assert!(!text.contains("hunter2"), "{text}");
        }
        // Ours, not PostgreSQL's: it never reaches the connection string.
        let o: PgOptions = "postgres://h/db?tables_per_hub=true&application_name=x"
            .parse()
            .unwrap();
        assert_eq!(o.config.get_application_name(), Some("x"));
    }

    #[test]
    fn custom_slug_implies_per_hub_and_prints() {
        let o = PgOptions::from_config(tokio_postgres::Config::new())
            .table_slug(|hub| format!("t_{hub}"));
        assert!(o.get_tables_per_hub());
        let copy = o.clone();
        assert_eq!(
            copy.table_slug.as_ref().map(|s| s.slug("chat")).as_deref(),
            Some("t_chat")
        );
        let debug = format!("{copy:?}");
        assert!(debug.contains("tables_per_hub: true"), "{debug}");
        assert!(debug.contains("table_slug: Some(<custom>)"), "{debug}");
        let off = copy.tables_per_hub(false);
        assert!(!off.get_tables_per_hub());
        assert!(off.table_slug.is_none());
    }
}
