//! `doctor`: checks a database for everything the driver needs and says what is wrong.

use tiberius::Query;

use crate::conn::{Conn, Connector, need};
use backplane_core::Check;

use crate::names::Names;
use crate::options::{Encrypt, MssqlOptions};
use crate::schema;
use crate::sql;

/// SQL Server 2016 is version 13.
const MIN_MAJOR: u32 = 13;

async fn server(conn: &mut Conn) -> Vec<Check> {
    let rows = match conn
        .rows(Query::new(sql::SERVER_INFO), "reading the server's version")
        .await
    {
        Ok(rows) => rows,
        Err(err) => return vec![Check::new("server", Err(err.to_string()))],
    };
    let Some(row) = rows.first() else {
        return vec![Check::new(
            "server",
            Err("the database is not in sys.databases".into()),
        )];
    };
    let context = "reading the server's version";
    let read = || -> backplane_core::Result<(String, String, String, i32, i32)> {
        Ok((
            need::<&str>(row, 0, context)?.to_owned(),
            need::<&str>(row, 1, context)?.to_owned(),
            need::<&str>(row, 2, context)?.to_owned(),
            need::<i32>(row, 3, context)?,
            need::<i32>(row, 4, context)?,
        ))
    };
    let (version, edition, database, level, rcsi) = match read() {
        Ok(found) => found,
        Err(err) => return vec![Check::new("server", Err(err.to_string()))],
    };
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let server = if major >= MIN_MAJOR || edition.contains("Azure") || edition.contains("Edge") {
        Ok(format!("SQL Server {version}, {edition}"))
    } else {
        Err(format!(
            "SQL Server {version}, {edition}: this driver needs SQL Server 2016 (13.x) or later"
        ))
    };
    let snapshot = if rcsi != 0 {
        Ok(format!(
            "{database}, compatibility level {level}; readers use row versions (READ_COMMITTED_SNAPSHOT ON)"
        ))
    } else {
        Err(sql::snapshot_required(&database))
    };
    vec![
        Check::new("server", server),
        Check::new("database", snapshot),
    ]
}

async fn permissions(conn: &mut Conn, options: &MssqlOptions) -> Check {
    let mut query = Query::new(sql::PERMISSIONS);
    query.bind(options.schema.as_str());
    let rows = match conn.rows(query, "checking permissions").await {
        Ok(rows) => rows,
        Err(err) => return Check::new("privileges", Err(err.to_string())),
    };
    let Some(row) = rows.first() else {
        return Check::new("privileges", Err("no answer".into()));
    };
    let context = "checking permissions";
    let flag = |column| need::<i32>(row, column, context).map(|v| v != 0);
    let (Ok(create_table), Ok(alter_schema), Ok(exists), Ok(create_schema)) =
        (flag(0), flag(1), flag(2), flag(3))
    else {
        return Check::new("privileges", Err("could not read the permissions".into()));
    };
    let granted = Granted {
        create_table,
        alter_schema,
        schema_exists: exists,
        create_schema,
    };
    Check::new("privileges", granted.verdict(options))
}

/// What the login may do, as the server answered.
#[derive(Debug, Clone, Copy)]
struct Granted {
    create_table: bool,
    alter_schema: bool,
    schema_exists: bool,
    create_schema: bool,
}

impl Granted {
    /// Whether the driver can create what it needs with `options`, and if not, what to grant.
    fn verdict(self, options: &MssqlOptions) -> Result<String, String> {
        if !options.create_schema {
            return Ok("create_schema=false: the schema is managed by a DBA".to_owned());
        }
        if !self.create_table {
            return Err("the login may not CREATE TABLE in this database: grant it, or set create_schema=false and run the DDL (--print-ddl)".to_owned());
        }
        match (self.schema_exists, self.alter_schema, self.create_schema) {
            (true, true, _) | (false, _, true) => Ok("may create tables in the schema".to_owned()),
            (true, false, _) => Err(format!(
                "the login may not ALTER schema {:?}: grant it, or set create_schema=false and run the DDL",
                options.schema
            )),
            (false, _, false) => Err(format!(
                "schema {:?} does not exist and the login may not CREATE SCHEMA: grant it, create the schema, or set create_schema=false and run the DDL",
                options.schema
            )),
        }
    }
}

async fn schema_check(conn: &mut Conn, names: &Names, options: &MssqlOptions) -> Check {
    let per_hub = options.tables_per_hub;
    let versions = match schema::read_versions(conn, names).await {
        Ok(versions) => versions,
        Err(err) => {
            return Check::new(
                "schema",
                Err(format!("could not read the migrations table: {err}")),
            );
        }
    };
    if versions.other_layout(per_hub) {
        return Check::new(
            "schema",
            Err(format!(
                "the tables under this schema and prefix are not of the layout tables_per_hub={per_hub}"
            )),
        );
    }
    let (version, latest) = (versions.version(per_hub), schema::latest_version(per_hub));
    if schema::behind(&versions, per_hub) {
        return Check::new(
            "schema",
            Err(format!(
                "version {version}, this driver needs {latest}: connect once with create_schema=true or run the DDL"
            )),
        );
    }
    Check::new("schema", Ok(format!("version {version}, up to date")))
}

async fn app_lock(conn: &mut Conn, names: &Names) -> Check {
    if let Err(err) = conn
        .lock_session(&names.lock, "taking the migration lock")
        .await
    {
        return Check::new("migration lock", Err(err.to_string()));
    }
    match conn
        .unlock_session(&names.lock, "releasing the migration lock")
        .await
    {
        Ok(()) => Check::new(
            "migration lock",
            Ok(format!("sp_getapplock on {:?} works", names.lock)),
        ),
        Err(err) => Check::new("migration lock", Err(err.to_string())),
    }
}

/// Checks connectivity and TLS, the server's version, privileges, the schema version and the
/// migration lock. Never fails: every problem is a failed [`Check`] with its reason.
pub async fn doctor(options: &MssqlOptions) -> Vec<Check> {
    let names = Names::new(options);
    let mut checks = Vec::new();
    if let Err(err) = options.validate() {
        checks.push(Check::new("options", Err(err.to_string())));
        return checks;
    }
    let connector = Connector::new(options, &options.endpoint.application_name);
    let mut conn = match connector.open().await {
        Ok(conn) => conn,
        Err(err) => {
            checks.push(Check::new(
                "connect",
                Err(format!(
                    "{}:{}: {}",
                    options.endpoint.host,
                    options.endpoint.port,
                    crate::error::describe(&err)
                )),
            ));
            return checks;
        }
    };
    let tls = match (
        options.endpoint.encrypt,
        options.endpoint.trust_server_certificate,
    ) {
        (Encrypt::Required, false) => "encrypted, server certificate verified",
        (Encrypt::Required, true) => {
            "encrypted, server certificate NOT verified (TrustServerCertificate)"
        }
        (Encrypt::LoginOnly, _) => "only the login is encrypted (Encrypt=false)",
    };
    checks.push(Check::new(
        "connect",
        Ok(format!(
            "{}:{} as {}; {tls}",
            options.endpoint.host, options.endpoint.port, options.endpoint.user
        )),
    ));
    checks.extend(server(&mut conn).await);
    checks.push(permissions(&mut conn, options).await);
    checks.push(schema_check(&mut conn, &names, options).await);
    checks.push(app_lock(&mut conn, &names).await);
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(
        create_table: bool,
        alter_schema: bool,
        exists: bool,
        create_schema: bool,
    ) -> Granted {
        Granted {
            create_table,
            alter_schema,
            schema_exists: exists,
            create_schema,
        }
    }

    #[test]
    fn privileges_name_what_to_grant() {
        let options = MssqlOptions::new("h", "u", "p");
        assert!(granted(true, true, true, false).verdict(&options).is_ok());
        assert!(granted(true, false, false, true).verdict(&options).is_ok());
        let verdict = |g: Granted| g.verdict(&options).expect_err("refused");
        assert!(verdict(granted(false, true, true, true)).contains("CREATE TABLE"));
        assert!(verdict(granted(true, false, true, true)).contains("ALTER schema"));
        assert!(verdict(granted(true, true, false, false)).contains("may not CREATE SCHEMA"));
        // A DBA manages the schema: nothing to grant.
        let managed = options.create_schema(false);
        assert!(
            granted(false, false, false, false)
                .verdict(&managed)
                .is_ok()
        );
    }
}
