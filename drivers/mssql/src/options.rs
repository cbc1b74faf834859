//! Connection strings (ADO.NET and `mssql://` URLs) and the driver's settings.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use backplane_core::schema::TableSlug;
use backplane_core::{DEFAULT_STREAMS, Driver as _, Error, url_scheme};

use crate::MssqlBackplane;

/// How the connection to SQL Server is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Encrypt {
    /// Everything is encrypted, and the server's certificate checked unless
    /// `TrustServerCertificate=true` (ADO.NET's `Encrypt=true`, `mandatory`, the default).
    #[default]
    Required,
    /// Only the login is encrypted, when the server supports it (ADO.NET's `Encrypt=false`).
    LoginOnly,
}

/// Where the server is and how to log in; the password never appears in `Debug` output or
/// errors.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) database: Option<String>,
    pub(crate) user: String,
    pub(crate) password: String,
    pub(crate) encrypt: Encrypt,
    pub(crate) trust_server_certificate: bool,
    pub(crate) ca_file: Option<String>,
    pub(crate) hostname_in_certificate: Option<String>,
    pub(crate) application_name: String,
    pub(crate) connect_timeout: Duration,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("encrypt", &self.encrypt)
            .field("trust_server_certificate", &self.trust_server_certificate)
            .field("ca_file", &self.ca_file)
            .field("application_name", &self.application_name)
            .finish_non_exhaustive()
    }
}

/// Settings of an [`MssqlBackplane`]: where the database is, which schema and tables to use,
/// how to batch and how to poll. Each setter states its default.
///
/// Parsed from an ADO.NET connection string or an `mssql://` (or `sqlserver://`) URL; see the
/// `FromStr` implementation for the keys.
///
/// # Examples
///
/// ```
/// use backplane_mssql::MssqlOptions;
///
/// let ado: MssqlOptions =
///     "Server=tcp:db.internal,1433;Database=chat;User Id=app;Password=s3cret;TrustServerCertificate=true"
///         .parse()?;
/// let url: MssqlOptions =
///     "mssql://app:s3cret@db.internal:1433/chat?trust_server_certificate=true".parse()?;
/// assert_eq!(ado.get_host(), url.get_host());
/// assert!(!format!("{ado:?}").contains("s3cret"));
/// # Ok::<(), backplane_core::Error>(())
/// ```
#[derive(Clone)]
pub struct MssqlOptions {
    pub(crate) endpoint: Endpoint,
    pub(crate) schema: String,
    pub(crate) table_prefix: String,
    pub(crate) streams: u32,
    pub(crate) pool_size: usize,
    pub(crate) batch_delay: Duration,
    pub(crate) max_batch: usize,
    pub(crate) create_schema: bool,
    pub(crate) tables_per_hub: bool,
    pub(crate) table_slug: Option<TableSlug>,
    pub(crate) poll_min: Duration,
    pub(crate) poll_max: Duration,
    pub(crate) command_timeout: Duration,
}

impl fmt::Debug for MssqlOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MssqlOptions")
            .field("endpoint", &self.endpoint)
            .field("schema", &self.schema)
            .field("table_prefix", &self.table_prefix)
            .field("streams", &self.streams)
            .field("pool_size", &self.pool_size)
            .field("batch_delay", &self.batch_delay)
            .field("max_batch", &self.max_batch)
            .field("create_schema", &self.create_schema)
            .field("tables_per_hub", &self.tables_per_hub)
            .field("table_slug", &self.table_slug)
            .field("poll_min", &self.poll_min)
            .field("poll_max", &self.poll_max)
            .finish_non_exhaustive()
    }
}

/// The most records one append request carries: the rows its statement generates to unpack
/// them (larger appends span several requests of one transaction).
pub(crate) const MAX_BATCH: usize = 1024;

fn bad(reason: impl Into<String>) -> Error {
    Error::permanent(
        MssqlBackplane::NAME,
        format!("invalid options: {}", reason.into()),
    )
}

/// A boolean as ADO.NET spells it: `true`/`yes`/`1` or `false`/`no`/`0`, any case.
fn boolean(key: &str, value: &str) -> Result<bool, Error> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(bad(format!("{key} must be true or false, not {value:?}"))),
    }
}

fn number(key: &str, value: &str) -> Result<u64, Error> {
    value
        .trim()
        .parse::<u64>()
        .map_err(|_| bad(format!("{key} must be a whole number, not {value:?}")))
}

/// A key with case, spaces and underscores removed: `User Id`, `user_id` and `USERID` are one.
fn normalize(key: &str) -> String {
    key.chars()
        .filter(|c| !c.is_whitespace() && *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Splits an ADO.NET connection string into key-value pairs. Values may be quoted with `'` or
/// `"` (the quote doubled inside), which lets them hold `;`.
fn ado_pairs(s: &str) -> Result<Vec<(String, String)>, Error> {
    let mut pairs = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix(';') {
            rest = after.trim_start();
            continue;
        }
        let Some(eq) = rest.find('=') else {
            let key = rest.split(';').next().unwrap_or(rest).trim();
            return Err(bad(format!(
                "connection string keyword {key:?} has no value: expected key=value"
            )));
        };
        let key = rest[..eq].trim();
        if key.is_empty() || key.contains(';') {
            return Err(bad("connection string has a value without a keyword"));
        }
        rest = rest[eq + 1..].trim_start();
        let value = if let Some(quote) = rest.chars().next().filter(|c| *c == '\'' || *c == '"') {
            let mut value = String::new();
            let mut chars = rest[1..].char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == quote {
                    if rest[1 + i + 1..].starts_with(quote) {
                        value.push(quote);
                        chars.next();
                    } else {
                        end = Some(1 + i + 1);
                        break;
                    }
                } else {
                    value.push(c);
                }
            }
            let Some(end) = end else {
                return Err(bad(format!("the value of {key:?} has no closing quote")));
            };
            rest = rest[end..].trim_start();
            if !rest.is_empty() && !rest.starts_with(';') {
                return Err(bad(format!(
                    "unexpected text after the quoted value of {key:?}"
                )));
            }
            value
        } else {
            let end = rest.find(';').unwrap_or(rest.len());
            let value = rest[..end].trim().to_owned();
            rest = &rest[end..];
            value
        };
        pairs.push((key.to_owned(), value));
    }
    Ok(pairs)
}

/// `host`, `host,port`, `tcp:host,port`, `(local)`, `.`, `[::1],1433`; named instances need
/// their port.
fn server(value: &str) -> Result<(String, Option<u16>), Error> {
    let value = value.trim();
    let lower = value.to_ascii_lowercase();
    let value = if lower.starts_with("tcp:") {
        &value[4..]
    } else if let Some((protocol, _)) = value
        .split_once(':')
        .filter(|(p, _)| matches!(p.to_ascii_lowercase().as_str(), "np" | "lpc" | "admin"))
    {
        return Err(bad(format!(
            "the {protocol}: protocol is not supported: connect over TCP (Server=tcp:host,port)"
        )));
    } else {
        value
    };
    let (host, port) = match value.rsplit_once(',') {
        Some((host, port)) => {
            let port = port.trim().parse::<u16>().map_err(|_| {
                bad(format!(
                    "the port in Server must be a number from 1 to 65535, not {:?}",
                    port.trim()
                ))
            })?;
            (host.trim(), Some(port))
        }
        None => (value, None),
    };
    let (host, instance) = match host.split_once('\\') {
        Some((host, instance)) => (host, Some(instance)),
        None => (host, None),
    };
    if let (Some(instance), None) = (instance, port) {
        return Err(bad(format!(
            "named instance {instance:?} needs its port (Server=host\\{instance},port): the SQL Server Browser is not asked"
        )));
    }
    let host = match host {
        "" => return Err(bad("Server names no host")),
        "." | "(local)" | "(localdb)" => "localhost",
        host => host.trim_start_matches('[').trim_end_matches(']'),
    };
    Ok((host.to_owned(), port))
}

/// What a connection string or URL said, before it becomes options.
#[derive(Default)]
struct Parsed {
    host: Option<String>,
    port: Option<u16>,
    database: Option<String>,
    user: Option<String>,
    password: Option<String>,
    /// Everything else, by normalized key, in order.
    settings: Vec<(String, String, String)>,
}

impl MssqlOptions {
    /// Options for a server and SQL Server login, with every other setting at its default.
    pub fn new(
        host: impl Into<String>,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        Self {
            endpoint: Endpoint {
                host: host.into(),
                port: 1433,
                database: None,
                user: user.into(),
                password: password.into(),
                encrypt: Encrypt::Required,
                trust_server_certificate: false,
                ca_file: None,
                hostname_in_certificate: None,
                application_name: "backplane".to_owned(),
                connect_timeout: Duration::from_secs(15),
            },
            schema: "backplane".to_owned(),
            table_prefix: String::new(),
            streams: DEFAULT_STREAMS,
            pool_size: 16,
            batch_delay: Duration::from_millis(1),
            max_batch: 512,
            create_schema: true,
            tables_per_hub: false,
            table_slug: None,
            poll_min: Duration::from_millis(2),
            poll_max: Duration::from_millis(50),
            command_timeout: Duration::from_secs(30),
        }
    }

    /// Whether `s` looks like an ADO.NET connection string (`Server=…;…`) rather than a URL.
    pub fn is_connection_string(s: &str) -> bool {
        url_scheme(s).is_none()
            && ado_pairs(s).is_ok_and(|pairs| {
                pairs.iter().any(|(k, _)| {
                    matches!(
                        normalize(k).as_str(),
                        "server" | "datasource" | "address" | "addr" | "networkaddress"
                    )
                })
            })
    }

    /// The TCP port. Defaults to 1433.
    pub fn port(mut self, port: u16) -> Self {
        self.endpoint.port = port;
        self
    }

    /// The database to use. Defaults to the login's default database.
    pub fn database(mut self, database: impl Into<String>) -> Self {
        self.endpoint.database = Some(database.into());
        self
    }

    /// How the connection is encrypted. Defaults to [`Encrypt::Required`].
    pub fn encrypt(mut self, encrypt: Encrypt) -> Self {
        self.endpoint.encrypt = encrypt;
        self
    }

    /// Whether to accept the server's certificate without checking it, as ADO.NET's
    /// `TrustServerCertificate` (for development servers with self-signed certificates).
    /// Defaults to `false`.
    pub fn trust_server_certificate(mut self, trust: bool) -> Self {
        self.endpoint.trust_server_certificate = trust;
        self
    }

    /// A PEM or DER file with the CA that signed the server's certificate, in place of the
    /// system's roots. Defaults to none.
    pub fn ca_file(mut self, path: impl Into<String>) -> Self {
        self.endpoint.ca_file = Some(path.into());
        self
    }

    /// The application name the server sees (`program_name` in `sys.dm_exec_sessions`).
    /// Defaults to `backplane`.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.endpoint.application_name = name.into();
        self
    }

    /// How long opening a connection may take. Defaults to 15 seconds.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.endpoint.connect_timeout = timeout;
        self
    }

    /// How long the server may keep one statement waiting before it fails (the connection is
    /// then discarded). Defaults to 30 seconds. A statement waiting for a lock fails on the
    /// server after two thirds of it (`LOCK_TIMEOUT`), so it never commits after the client
    /// gave up.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
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

    /// How long a batch (one multi-row insert) waits for more appends under load; an append on
    /// an idle stream is written at once. Zero turns batching off. Defaults to 1 ms.
    pub fn batch_delay(mut self, delay: Duration) -> Self {
        self.batch_delay = delay;
        self
    }

    /// The most records written by one batch, at most 1 024 (the rows one append request
    /// unpacks). Defaults to 512.
    pub fn max_batch(mut self, records: usize) -> Self {
        self.max_batch = records.clamp(1, MAX_BATCH);
        self
    }

    /// Whether to create and migrate the schema on connect. When `false`, the schema must
    /// exist already (see [`MssqlBackplane::ddl`]). Defaults to `true`.
    pub fn create_schema(mut self, create: bool) -> Self {
        self.create_schema = create;
        self
    }

    /// Whether every hub gets a table set of its own (`{prefix}{slug}_streams` and so on),
    /// created on the hub's first use, instead of one table set shared by all hubs. Every node
    /// of a deployment must use the same setting. Setting it to `false` also drops a custom
    /// slug function. Defaults to `false`.
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
    /// `{prefix}{slug}_memberships`, fits SQL Server's 128 characters.
    ///
    /// The default slug is the hub name lowercased, every character other than `a`-`z`, `0`-`9`
    /// and `_` replaced by `_`, cut to 48 bytes, then `_` and 8 hex digits of a hash of the
    /// exact name.
    pub fn table_slug(mut self, slug: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.table_slug = Some(TableSlug::new(slug));
        self.tables_per_hub = true;
        self
    }

    /// The shortest and longest pause between two polls for appends by other nodes: polling
    /// runs at the shortest while appends keep coming and doubles its pause after each poll
    /// that finds nothing, up to the longest. Defaults to 2 ms and 50 ms.
    pub fn poll_interval(mut self, min: Duration, max: Duration) -> Self {
        self.poll_min = min.max(Duration::from_millis(1));
        self.poll_max = max.max(self.poll_min);
        self
    }

    /// The host.
    pub fn get_host(&self) -> &str {
        &self.endpoint.host
    }

    /// The port.
    pub fn get_port(&self) -> u16 {
        self.endpoint.port
    }

    /// The database, when one is named.
    pub fn get_database(&self) -> Option<&str> {
        self.endpoint.database.as_deref()
    }

    /// The login.
    pub fn get_user(&self) -> &str {
        &self.endpoint.user
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

    /// The encryption mode.
    pub fn get_encrypt(&self) -> Encrypt {
        self.endpoint.encrypt
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.schema.is_empty() || self.schema.chars().count() > 64 {
            return Err(bad("the schema name must be 1 to 64 characters long"));
        }
        if self.table_prefix.chars().count() > 20 {
            return Err(bad("the table prefix must be at most 20 characters long"));
        }
        for (what, value) in [
            ("schema name", &self.schema),
            ("table prefix", &self.table_prefix),
        ] {
            if value.chars().any(char::is_control) {
                return Err(bad(format!(
                    "the {what} must not contain control characters"
                )));
            }
        }
        if self.endpoint.user.is_empty() {
            return Err(bad(
                "no login: give User Id and Password (SQL Server authentication)",
            ));
        }
        Ok(())
    }

    /// The tiberius configuration of a connection named `application`.
    /// How long a statement may wait for a lock, `sp_getapplock` included: two thirds of the
    /// command timeout, so the server fails the statement before the client gives up on it.
    pub(crate) fn lock_timeout(&self) -> Duration {
        self.command_timeout * 2 / 3
    }

    pub(crate) fn tds_config(&self, application: &str) -> tiberius::Config {
        let e = &self.endpoint;
        let mut config = tiberius::Config::new();
        config.host(&e.host);
        config.port(e.port);
        if let Some(database) = &e.database {
            config.database(database);
        }
        config.authentication(tiberius::AuthMethod::sql_server(&e.user, &e.password));
        config.encryption(match e.encrypt {
            Encrypt::Required => tiberius::EncryptionLevel::Required,
            Encrypt::LoginOnly => tiberius::EncryptionLevel::Off,
        });
        if e.trust_server_certificate {
            config.trust_cert();
        } else if let Some(ca) = &e.ca_file {
            config.trust_cert_ca(ca);
        }
        if let Some(name) = &e.hostname_in_certificate {
            config.hostname_in_certificate(name);
        }
        config.application_name(application);
        config.command_timeout(Some(self.command_timeout));
        config.handshake_timeout(Some(e.connect_timeout));
        config
    }

    fn from_parsed(parsed: Parsed) -> Result<Self, Error> {
        let host = parsed
            .host
            .ok_or_else(|| bad("no server: give Server=host,port"))?;
        let user = parsed.user.unwrap_or_default();
        let password = parsed.password.unwrap_or_default();
        let mut options = Self::new(host, user, password);
        if let Some(port) = parsed.port {
            options = options.port(port);
        }
        if let Some(database) = parsed.database.filter(|d| !d.is_empty()) {
            options = options.database(database);
        }
        let (mut poll_min, mut poll_max) = (options.poll_min, options.poll_max);
        for (norm, key, value) in &parsed.settings {
            let (key, value) = (key.as_str(), value.as_str());
            let ms = || number(key, value).map(Duration::from_millis);
            let secs = || number(key, value).map(Duration::from_secs);
            options = match norm.as_str() {
                "encrypt" => match value.to_ascii_lowercase().as_str() {
                    "true" | "yes" | "mandatory" | "1" => options.encrypt(Encrypt::Required),
                    "false" | "no" | "optional" | "0" => options.encrypt(Encrypt::LoginOnly),
                    "strict" => {
                        return Err(bad(
                            "Encrypt=strict (TDS 8.0) is not supported: use Encrypt=true",
                        ));
                    }
                    _ => {
                        return Err(bad(format!(
                            "Encrypt must be true, false, mandatory or optional, not {value:?}"
                        )));
                    }
                },
                "trustservercertificate" => options.trust_server_certificate(boolean(key, value)?),
                "hostnameincertificate" => {
                    options.endpoint.hostname_in_certificate = Some(value.to_owned());
                    options
                }
                "servercertificate" | "cafile" | "sslrootcert" => options.ca_file(value),
                "applicationname" | "app" => options.application_name(value),
                "connecttimeout" | "connectiontimeout" | "timeout" => {
                    options.connect_timeout(secs()?)
                }
                "commandtimeout" => options.command_timeout(secs()?),
                "trustedconnection" | "integratedsecurity" => {
                    if matches!(value.to_ascii_lowercase().as_str(), "false" | "no" | "0") {
                        options
                    } else {
                        return Err(bad(format!(
                            "{key}={value}: integrated Windows authentication is not supported; use SQL Server authentication (User Id and Password)"
                        )));
                    }
                }
                "authentication" => {
                    if normalize(value) == "sqlpassword" {
                        options
                    } else {
                        return Err(bad(format!(
                            "Authentication={value} is not supported; use SQL Server authentication (Authentication=SqlPassword, User Id and Password)"
                        )));
                    }
                }
                "applicationintent" => {
                    if normalize(value) == "readwrite" {
                        options
                    } else {
                        return Err(bad(
                            "ApplicationIntent must be ReadWrite: the backplane writes",
                        ));
                    }
                }
                "maxpoolsize" | "poolsize" => options.pool_size(
                    usize::try_from(number(key, value)?)
                        .map_err(|_| bad("pool size is too large"))?,
                ),
                // ADO.NET's own pooling and session settings: the driver pools by itself.
                "pooling"
                | "minpoolsize"
                | "multipleactiveresultsets"
                | "persistsecurityinfo"
                | "multisubnetfailover"
                | "packetsize"
                | "workstationid"
                | "wsid"
                | "currentlanguage"
                | "language"
                | "loadbalancetimeout"
                | "connectretrycount"
                | "connectretryinterval" => options,
                // Common in .NET applications' strings and harmless here: distributed
                // transactions, pool tuning, Always Encrypted (the backplane's columns are not
                // encrypted), type system and resolution details.
                "enlist"
                | "connectionlifetime"
                | "connectionreset"
                | "poolblockingperiod"
                | "transactionbinding"
                | "typesystemversion"
                | "columnencryptionsetting"
                | "enclaveattestationurl"
                | "attestationprotocol"
                | "transparentnetworkipresolution"
                | "ipaddresspreference"
                | "serverspn"
                | "asynchronousprocessing"
                | "async"
                | "replication" => {
                    tracing::debug!(
                        keyword = key,
                        "ignoring a connection string keyword the backplane does not need"
                    );
                    options
                }
                // Database mirroring: the driver connects to the principal only.
                "failoverpartner" | "failoverpartnerspn" => {
                    tracing::warn!(
                        keyword = key,
                        value,
                        "ignoring the mirroring failover partner: the backplane connects to Server only"
                    );
                    options
                }
                "networklibrary" | "network" | "net" => {
                    if normalize(value) == "dbmssocn" {
                        options
                    } else {
                        return Err(bad(format!(
                            "{key}={value}: only TCP (dbmssocn) is supported"
                        )));
                    }
                }
                "userinstance" | "contextconnection" => {
                    if boolean(key, value)? {
                        return Err(bad(format!("{key}=true is not supported")));
                    }
                    options
                }
                "attachdbfilename" | "initialfilename" | "extendedproperties" => {
                    return Err(bad(format!(
                        "{key}: attaching a database file is not supported; name the database with Database"
                    )));
                }
                "schema" => options.schema(value),
                "tableprefix" => options.table_prefix(value),
                "streams" => options.streams(
                    u32::try_from(number(key, value)?).map_err(|_| bad("streams is too large"))?,
                ),
                "batchdelayms" => options.batch_delay(ms()?),
                "maxbatch" => options.max_batch(
                    usize::try_from(number(key, value)?)
                        .map_err(|_| bad("max_batch is too large"))?,
                ),
                "createschema" => options.create_schema(boolean(key, value)?),
                "tablesperhub" => options.tables_per_hub(boolean(key, value)?),
                "pollminms" => {
                    poll_min = ms()?;
                    options
                }
                "pollmaxms" => {
                    poll_max = ms()?;
                    options
                }
                _ => return Err(bad(format!("unknown connection string keyword {key:?}"))),
            };
        }
        options = options.poll_interval(poll_min, poll_max);
        options.validate()?;
        Ok(options)
    }

    fn parse_ado(s: &str) -> Result<Self, Error> {
        let mut parsed = Parsed::default();
        for (key, value) in ado_pairs(s)? {
            match normalize(&key).as_str() {
                "server" | "datasource" | "address" | "addr" | "networkaddress" => {
                    let (host, port) = server(&value)?;
                    parsed.host = Some(host);
                    parsed.port = port;
                }
                "database" | "initialcatalog" => parsed.database = Some(value),
                "userid" | "uid" | "user" | "username" => parsed.user = Some(value),
                "password" | "pwd" => parsed.password = Some(value),
                norm => parsed.settings.push((norm.to_owned(), key, value)),
            }
        }
        Self::from_parsed(parsed)
    }

    fn parse_url(url: &str) -> Result<Self, Error> {
        let decode = |what: &str, s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|v| v.into_owned())
                .map_err(|_| bad(format!("the {what} is not valid UTF-8 once decoded")))
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad("expected mssql://user:password@host:port/database"));
        };
        if !matches!(scheme, "mssql" | "sqlserver") {
            return Err(bad(format!(
                "the URL scheme must be mssql or sqlserver, not {scheme:?}"
            )));
        }
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut parsed = Parsed::default();
        let host_port = match authority.rsplit_once('@') {
            Some((credentials, host)) => {
                let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
                parsed.user = Some(decode("user", user)?);
                parsed.password = Some(decode("password", password)?);
                host
            }
            None => authority,
        };
        let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 host needs its closing ]"))?;
            (host, after.strip_prefix(':'))
        } else {
            match host_port.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (host_port, None),
            }
        };
        if host.is_empty() {
            return Err(bad("the URL names no host"));
        }
        parsed.host = Some(decode("host", host)?);
        if let Some(port) = port {
            parsed.port = Some(port.parse::<u16>().map_err(|_| {
                bad(format!(
                    "the port must be a number from 1 to 65535, not {port:?}"
                ))
            })?);
        }
        if !path.is_empty() {
            parsed.database = Some(decode("database", path)?);
        }
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode("query key", key)?;
            let value = decode(&format!("value of {key}"), value)?;
            match normalize(&key).as_str() {
                "database" | "initialcatalog" => parsed.database = Some(value),
                "user" | "userid" => parsed.user = Some(value),
                "password" => parsed.password = Some(value),
                norm => parsed.settings.push((norm.to_owned(), key, value)),
            }
        }
        Self::from_parsed(parsed)
    }
}

impl FromStr for MssqlOptions {
    type Err = Error;

    /// Parses an ADO.NET connection string
    /// (`Server=tcp:host,1433;Database=…;User Id=…;Password=…;TrustServerCertificate=true;Encrypt=true`)
    /// or a URL (`mssql://user:password@host:1433/database?trust_server_certificate=true`).
    ///
    /// Keys compare without case, spaces and underscores, in both forms. The connection:
    /// `Server` (also `Data Source`, `Address`), `Database` (`Initial Catalog`), `User Id`
    /// (`UID`), `Password` (`PWD`), `Encrypt` (`true`/`mandatory`, `false`/`optional`),
    /// `TrustServerCertificate`, `HostNameInCertificate`, `ServerCertificate` (a CA file; also
    /// `ca_file`), `Application Name`, `Connect Timeout` and `Command Timeout` (seconds),
    /// `Max Pool Size`. ADO.NET's pooling and session keys (`Pooling`, `MultipleActiveResultSets`,
    /// …) are accepted and ignored. The backplane: `schema`, `table_prefix`, `streams`,
    /// `pool_size`, `batch_delay_ms`, `max_batch`, `create_schema`, `tables_per_hub`,
    /// `poll_min_ms`, `poll_max_ms`.
    ///
    /// Refused with a clear error: integrated Windows authentication (`Trusted_Connection`,
    /// `Integrated Security`), Azure AD `Authentication` modes, named pipes, a named instance
    /// without its port, `Encrypt=strict`, and unknown keys. Errors never echo the password.
    fn from_str(s: &str) -> Result<Self, Error> {
        if url_scheme(s).is_some() {
            Self::parse_url(s)
        } else {
            Self::parse_ado(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> MssqlOptions {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn refuse(s: &str) -> String {
        let err = s.parse::<MssqlOptions>().expect_err(s).to_string();
        assert!(!err.contains("hunter2"), "{err}");
        err
    }

    #[test]
    fn keywords_of_dotnet_strings_that_change_nothing_are_accepted() {
        let dotnet = "Server=tcp:db.example.com,1433;Initial Catalog=app;User ID=u;Password=p;\
            Enlist=false;Connection Lifetime=300;Failover Partner=db2;\
            Column Encryption Setting=Enabled;Pooling=true;Max Pool Size=20;\
            Connection Reset=true;Pool Blocking Period=Auto;Type System Version=Latest;\
            Transaction Binding=Implicit Unbind;Network Library=DBMSSOCN;\
            Transparent Network IP Resolution=false;Asynchronous Processing=true;\
            User Instance=false;Multiple Active Result Sets=true";
        let options: MssqlOptions = dotnet.parse().expect("a common .NET string parses");
        let plain: MssqlOptions = "Server=tcp:db.example.com,1433;Initial Catalog=app;User ID=u;Password=p;Max Pool Size=20"
            .parse()
            .expect("parses");
        assert_eq!(format!("{options:?}"), format!("{plain:?}"));
    }

    #[test]
    fn ado_strings_parse() {
        let o = parse(
            "Server=tcp:db.example.com,1444;Database=chat;User Id=app;Password=hunter2;TrustServerCertificate=true;Encrypt=true",
        );
        assert_eq!(o.endpoint.host, "db.example.com");
        assert_eq!(o.endpoint.port, 1444);
        assert_eq!(o.get_database(), Some("chat"));
        assert_eq!(o.get_user(), "app");
        assert_eq!(o.endpoint.password, "hunter2");
        assert!(o.endpoint.trust_server_certificate);
        assert_eq!(o.get_encrypt(), Encrypt::Required);

        let o = parse(
            "Data Source=(local);Initial Catalog=rt;UID=sa;PWD='pa;ss''word';Encrypt=optional;Application Name=chat-1;Connect Timeout=5;schema=Rt;Table Prefix=x_;streams=8;MultipleActiveResultSets=True;Max Pool Size=7",
        );
        assert_eq!(o.endpoint.host, "localhost");
        assert_eq!(o.endpoint.port, 1433);
        assert_eq!(o.endpoint.password, "pa;ss'word");
        assert_eq!(o.get_encrypt(), Encrypt::LoginOnly);
        assert_eq!(o.endpoint.application_name, "chat-1");
        assert_eq!(o.endpoint.connect_timeout, Duration::from_secs(5));
        assert_eq!(o.get_schema(), "Rt");
        assert_eq!(o.get_table_prefix(), "x_");
        assert_eq!(o.streams, 8);
        assert_eq!(o.pool_size, 7);

        let o = parse(
            "server = [::1],1500 ; user id = u ; password = \"a\"\"b\" ; tables_per_hub = yes ;",
        );
        assert_eq!(o.endpoint.host, "::1");
        assert_eq!(o.endpoint.port, 1500);
        assert_eq!(o.endpoint.password, "a\"b");
        assert!(o.get_tables_per_hub());

        let o = parse("Server=db\\SQLEXPRESS,1433;User Id=u;Password=p");
        assert_eq!(o.endpoint.host, "db");
    }

    #[test]
    fn urls_parse() {
        let o = parse(
            "mssql://app:p%40ss%3Aw0rd@db.internal:1444/chat?trust_server_certificate=true&schema=rt&poll_min_ms=1&poll_max_ms=20&batch_delay_ms=0&create_schema=false",
        );
        assert_eq!(o.endpoint.host, "db.internal");
        assert_eq!(o.endpoint.port, 1444);
        assert_eq!(o.endpoint.user, "app");
        assert_eq!(o.endpoint.password, "p@ss:w0rd");
        assert_eq!(o.get_database(), Some("chat"));
        assert!(o.endpoint.trust_server_certificate);
        assert_eq!(o.get_schema(), "rt");
        assert_eq!(o.poll_min, Duration::from_millis(1));
        assert_eq!(o.poll_max, Duration::from_millis(20));
        assert!(o.batch_delay.is_zero());
        assert!(!o.create_schema);

        let o = parse("sqlserver://sa:x@[::1]/db?TrustServerCertificate=True&Encrypt=false");
        assert_eq!(o.endpoint.host, "::1");
        assert_eq!(o.endpoint.port, 1433);
        assert!(o.endpoint.trust_server_certificate);
        assert_eq!(o.get_encrypt(), Encrypt::LoginOnly);
    }

    #[test]
    fn bad_strings_are_refused_clearly() {
        let cases = [
            (
                "Server=db;Trusted_Connection=true;Password=hunter2",
                "integrated Windows authentication is not supported",
            ),
            (
                "Server=db;Integrated Security=SSPI;Password=hunter2",
                "integrated Windows authentication is not supported",
            ),
            (
                "Server=db;User Id=u;Password=hunter2;Authentication=ActiveDirectoryPassword",
                "Authentication=ActiveDirectoryPassword is not supported",
            ),
            (
                "Server=np:\\\\db\\pipe;User Id=u;Password=hunter2",
                "np: protocol",
            ),
            (
                "Server=db\\SQLEXPRESS;User Id=u;Password=hunter2",
                "needs its port",
            ),
            (
                "Server=db,99999;User Id=u;Password=hunter2",
                "port in Server",
            ),
            (
                "Server=db;User Id=u;Password=hunter2;Network Library=dbnmpntw",
                "only TCP",
            ),
            (
                "Server=db;User Id=u;Password=hunter2;User Instance=true",
                "User Instance=true is not supported",
            ),
            (
                "Server=db;User Id=u;Password=hunter2;AttachDbFilename=|DataDirectory|x.mdf",
                "attaching a database file is not supported",
            ),
            (
                "Server=db;User Id=u;Password=hunter2;Frobnicate=1",
                "unknown connection string keyword \"Frobnicate\"",
            ),
            ("Server=db;User Id=u;Password='hunter2", "no closing quote"),
            (
                "Server=db;User Id=u;Password=hunter2;Encrypt=strict",
                "TDS 8.0",
            ),
            (
                "Server=db;User Id=u;Password=hunter2;Encrypt=maybe",
                "Encrypt must be",
            ),
            (
                "Server=db;User Id=u;Password=hunter2;streams=x",
                "streams must be a whole number",
            ),
            ("Server=db;Password=hunter2", "no login"),
            ("Database=x;User Id=u;Password=hunter2", "no server"),
            (
                "Server=db;User Id=u;Password=hunter2;garbage",
                "has no value",
            ),
            ("mssql://u:hunter2@:1433/db", "names no host"),
            ("mssql://u:hunter2@db:port/db", "port must be a number"),
            ("postgres://u:hunter2@db/db", "scheme must be mssql"),
            (
                "mssql://u:hunter2@db/db?tables_per_hub=sometimes",
                "tables_per_hub must be true or false",
            ),
            (
                "mssql://u:hunter2@db/db?schema=",
                "schema name must be 1 to 64",
            ),
            (
                "mssql://u:hunter2@db/db?ApplicationIntent=ReadOnly",
                "ApplicationIntent",
            ),
        ];
        for (s, expected) in cases {
            let err = refuse(s);
            assert!(err.contains(expected), "{s}: {err}");
        }
    }

    #[test]
    fn password_never_printed() {
        let o = parse("Server=db;User Id=u;Password=hunter2");
        assert!(!format!("{o:?}").contains("hunter2"));
        assert!(format!("{o:?}").contains("<redacted>"));
    }

    #[test]
    fn connection_strings_are_told_from_urls() {
        assert!(MssqlOptions::is_connection_string(
            "Server=db;User Id=u;Password=p"
        ));
        assert!(MssqlOptions::is_connection_string(
            "Data Source=db,1433;UID=u"
        ));
        assert!(!MssqlOptions::is_connection_string("mssql://u:p@db/x"));
        assert!(!MssqlOptions::is_connection_string("memory://"));
        assert!(!MssqlOptions::is_connection_string("host=db user=u"));
        // A password may hold `://` and still be a connection string's.
        let odd = "Server=db;User Id=u;Password=a://b";
        assert!(MssqlOptions::is_connection_string(odd));
        assert!(odd.parse::<MssqlOptions>().is_ok());
    }

    #[test]
    fn limits_are_clamped() {
        let o = MssqlOptions::new("h", "u", "p")
            .max_batch(100_000)
            .poll_interval(Duration::ZERO, Duration::ZERO);
        assert_eq!(o.max_batch, MAX_BATCH);
        assert_eq!(o.poll_min, Duration::from_millis(1));
        assert_eq!(o.poll_max, Duration::from_millis(1));
    }
}
