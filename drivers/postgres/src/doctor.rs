//! `doctor`: checks a database for everything the driver needs and says what is wrong.

use std::time::Duration;

use tokio_postgres::AsyncMessage;

use crate::error::describe;
use backplane_core::Check;

use crate::options::PgOptions;
use crate::schema::{self, Names, quote};
use crate::tls::SslMode;

const TIMEOUT: Duration = Duration::from_secs(10);

/// The schema version of the layout `options` asks for and, with tables per hub, how many hubs
/// have tables (and whether any is behind).
async fn schema_check(
    client: &tokio_postgres::Client,
    names: &Names,
    options: &PgOptions,
) -> Result<String, String> {
    let per_hub = options.tables_per_hub;
    let versions = schema::read_versions(client, names)
        .await
        .map_err(|err| format!("could not read the migrations table: {err}"))?;
    if versions.other_layout(per_hub) {
        return Err(format!(
            "the tables under this schema and prefix are not of the layout tables_per_hub={per_hub}: use that setting, or another schema or table prefix"
        ));
    }
    let (version, latest) = (versions.version(per_hub), schema::latest_version(per_hub));
    if schema::behind(&versions, per_hub) {
        return Err(format!(
            "version {version}, this driver needs {latest}: connect once with create_schema=true or run the DDL"
        ));
    }
    if !per_hub {
        return Ok(format!("version {version}, up to date"));
    }
    let hubs = schema::registered_hubs(client, names)
        .await
        .map_err(|err| format!("could not read the registry of hubs: {err}"))?;
    let behind: Vec<&str> = hubs
        .iter()
        .filter(|(_, _, v)| *v < schema::latest_set())
        .map(|(hub, _, _)| hub.as_str())
        .collect();
    if behind.is_empty() {
        Ok(format!(
            "version {version}, up to date; {} hubs with tables of their own",
            hubs.len()
        ))
    } else {
        Err(format!(
            "the tables of hubs {behind:?} are missing or old: connect with create_schema=true or run their DDL (PgBackplane::hub_ddl)"
        ))
    }
}

/// Checks connectivity, server version, privileges, the schema version and a LISTEN/NOTIFY
/// round trip. Never fails: every problem is a failed [`Check`] with its reason.
pub async fn doctor(options: &PgOptions) -> Vec<Check> {
    let names = Names::new(options);
    let mut checks = Vec::new();
    let (config, tls) = match options.connect_parts() {
        Ok(parts) => parts,
        Err(err) => {
            checks.push(Check::new("tls", Err(err.to_string())));
            return checks;
        }
    };
    let connect = tokio::time::timeout(TIMEOUT, config.connect(tls)).await;
    let (client, connection) = match connect {
        Ok(Ok(pair)) => pair,
        Ok(Err(err)) => {
            checks.push(Check::new(
                "connect",
                Err(format!("could not connect: {}", describe(&err))),
            ));
            return checks;
        }
        Err(_) => {
            checks.push(Check::new(
                "connect",
                Err(format!(
                    "no answer within {TIMEOUT:?}: check host, port and firewall"
                )),
            ));
            return checks;
        }
    };
    let (notify_tx, mut notify_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut connection = connection;
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = notify_tx.send(n.payload().to_owned());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });

    let about = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_user, current_database()",
            &[],
        )
        .await;
    let about = about.and_then(|row| {
        Ok((
            row.try_get::<_, i32>(0)?,
            row.try_get::<_, String>(1)?,
            row.try_get::<_, String>(2)?,
        ))
    });
    let version = match about {
        Ok((version, user, database)) => {
            checks.push(Check::new(
                "connect",
                Ok(format!("connected to database {database:?} as {user:?}")),
            ));
            version
        }
        Err(err) => {
            checks.push(Check::new(
                "connect",
                Err(format!("the first query failed: {}", describe(&err))),
            ));
            return checks;
        }
    };
    checks.push(Check::new(
        "server version",
        if version >= 120_000 {
            Ok(format!(
                "PostgreSQL {}.{}",
                version / 10_000,
                version % 10_000
            ))
        } else {
            Err(format!(
                "PostgreSQL {}: version 12 or later is required",
                version / 10_000
            ))
        },
    ));

    let tls = client
        .query_opt(
            "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl",
            &[],
        )
        .await
        .and_then(|row| row.map(|r| r.try_get::<_, String>(0)).transpose());
    checks.push(Check::new(
        "tls",
        match (tls, options.ssl_mode) {
            (Ok(Some(version)), mode) => Ok(format!("encrypted with {version} (sslmode {mode:?})")),
            (Ok(None), SslMode::Disable) => Ok("not encrypted (sslmode disable)".to_owned()),
            (Ok(None), _) => Ok(
                "not encrypted: the server offers no TLS (sslmode prefer); use sslmode=verify-full in production".to_owned(),
            ),
            (Err(err), _) => Err(format!("could not read the TLS state: {}", describe(&err))),
        },
    ));

    let schema_exists = client
        .query_one(
            "SELECT count(*) > 0 FROM pg_namespace WHERE nspname = $1",
            &[&options.schema],
        )
        .await
        .and_then(|r| r.try_get::<_, bool>(0))
        .unwrap_or(false);
    let privileges = if schema_exists {
        client
            .query_one(
                "SELECT has_schema_privilege($1, 'USAGE'), has_schema_privilege($1, 'CREATE')",
                &[&options.schema],
            )
            .await
            .and_then(|r| Ok((r.try_get::<_, bool>(0)?, r.try_get::<_, bool>(1)?)))
    } else {
        client
            .query_one(
                "SELECT true, has_database_privilege(current_database(), 'CREATE')",
                &[],
            )
            .await
            .and_then(|r| Ok((r.try_get::<_, bool>(0)?, r.try_get::<_, bool>(1)?)))
    };
    let can_create = matches!(privileges, Ok((_, true)));
    checks.push(Check::new(
        "privileges",
        match privileges {
            Ok((true, true)) => Ok(format!("may use and create tables in schema {:?}", options.schema)),
            Ok((true, false)) if schema_exists => Ok(format!(
                "may use schema {:?} but not create in it: fine once the tables exist (create_schema=false)",
                options.schema
            )),
            Ok((false, _)) => Err(format!(
                "no USAGE on schema {:?}: GRANT USAGE ON SCHEMA {} TO the application's role",
                options.schema,
                quote(&options.schema)
            )),
            Ok(_) => Err(format!(
                "schema {:?} does not exist and this role may not create it: run the DDL (PgBackplane::ddl) as an owner, or GRANT CREATE ON DATABASE",
                options.schema
            )),
            Err(err) => Err(format!("could not read privileges: {}", describe(&err))),
        },
    ));

    checks.push(Check::new(
        "schema version",
        if !schema_exists && can_create {
            Ok(format!(
                "schema {:?} does not exist yet; it is created on first connect",
                options.schema
            ))
        } else if !schema_exists {
            Err(format!(
                "schema {:?} does not exist and cannot be created by this role: run the DDL (PgBackplane::ddl) as its owner",
                options.schema
            ))
        } else {
            schema_check(&client, &names, options).await
        },
    ));

    let channel = format!("backplane.doctor.{}", std::process::id());
    let round_trip = async {
        client
            .batch_execute(&format!("LISTEN {}", quote(&channel)))
            .await
            .map_err(|e| format!("LISTEN failed: {}", describe(&e)))?;
        client
            .execute("SELECT pg_notify($1, 'ping')", &[&channel])
            .await
            .map_err(|e| format!("NOTIFY failed: {}", describe(&e)))?;
        match tokio::time::timeout(TIMEOUT, notify_rx.recv()).await {
            Ok(Some(payload)) if payload == "ping" => Ok("LISTEN/NOTIFY works".to_owned()),
            Ok(_) => Err("the notification did not arrive".to_owned()),
            Err(_) => Err(format!(
                "no notification within {TIMEOUT:?}: a connection pooler in transaction mode (PgBouncer) drops LISTEN; connect the backplane directly or in session mode"
            )),
        }
    };
    checks.push(Check::new("listen/notify", round_trip.await));
    checks
}
