//! Every statement and batch the driver can send, rendered for a set of options, so that a
//! T-SQL grammar can check them without a server (`cargo run -p backplane-mssql --example tsql
//! -- DIR` writes them to files; the test script parses each with `sqlfluff`).

use crate::MssqlOptions;
use crate::names::{self, Names, SetNames};
use crate::schema;
use crate::sql::{self, NodeSql, Sql};

/// One statement or batch, as the driver sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// What it is, usable as a file name: lowercase letters, digits and `-`.
    pub name: String,
    /// The text sent to the server.
    pub text: String,
}

/// The hub whose table set the statements of a tables-per-hub layout are rendered for: a name
/// with quotes and brackets in it, as the driver must cope with.
pub const SAMPLE_HUB: &str = "o'dd]hub(";

/// Every statement and batch the driver sends with `options`: the session settings, schema
/// management and migrations, the node-wide statements, and each table set's (the default
/// set's, or with tables per hub the one of [`SAMPLE_HUB`]). Statements whose text depends on
/// a count (heartbeats over so many sets) come in the sizes that change their shape.
pub fn render(options: &MssqlOptions) -> Vec<Statement> {
    let names = Names::new(options);
    let set = if options.tables_per_hub {
        SetNames::hub(options, &names::default_slug(SAMPLE_HUB))
    } else {
        SetNames::shared(options)
    };
    let node = NodeSql::new(&names);
    let sql = Sql::new(&set);
    let mut out: Vec<(String, String)> = vec![
        (
            "session-settings".into(),
            sql::session_settings(options.lock_timeout()),
        ),
        ("lock-session".into(), sql::LOCK_SESSION.into()),
        ("unlock-session".into(), sql::UNLOCK_SESSION.into()),
        (
            "begin-locked".into(),
            sql::begin_locked(&names.lock, sql::millis(options.lock_timeout())),
        ),
        ("commit".into(), "COMMIT TRANSACTION".into()),
        ("rollback".into(), sql::ROLLBACK.into()),
        ("create-schema".into(), sql::CREATE_SCHEMA.into()),
        ("migrations-table".into(), sql::migrations_table(&names)),
        ("versions".into(), sql::versions(&names)),
        ("hub-state".into(), sql::hub_state(&names)),
        ("slug-holder".into(), sql::slug_holder(&names)),
        ("register-hub".into(), sql::register_hub(&names)),
        ("registered-hubs".into(), sql::registered_hubs(&names)),
        ("server-info".into(), sql::SERVER_INFO.into()),
        ("snapshot-reads".into(), sql::SNAPSHOT_READS.into()),
        ("permissions".into(), sql::PERMISSIONS.into()),
        ("kill-program".into(), sql::KILL_PROGRAM.into()),
        ("drop-schema".into(), sql::DROP_SCHEMA.into()),
        ("register-node".into(), node.register_node.clone()),
        ("live-nodes".into(), node.live_nodes.clone()),
        ("heartbeat-0-sets".into(), node.heartbeat(&[])),
        ("heartbeat-1-set".into(), node.heartbeat(&[&set])),
        ("heartbeat-2-sets".into(), node.heartbeat(&[&set, &set])),
        ("unregister-node".into(), node.unregister_node(&[&set])),
        (
            "unregister-node-2-sets".into(),
            node.unregister_node(&[&set, &set]),
        ),
        ("reap-nodes".into(), node.reap_nodes(&[&set])),
        ("reap-nodes-2-sets".into(), node.reap_nodes(&[&set, &set])),
        ("create-stream".into(), sql.create_stream.clone()),
        ("tail".into(), sql.tail.clone()),
        ("read".into(), sql.read.clone()),
        ("trim-streams".into(), sql.trim_streams.clone()),
        ("trim".into(), sql.trim.clone()),
        ("trim-delete".into(), sql.trim_delete.clone()),
        ("add-connection".into(), sql.add_connection.clone()),
        ("remove-connection".into(), sql.remove_connection.clone()),
        ("connection".into(), sql.connection.clone()),
        ("user-connections".into(), sql.user_connections.clone()),
        ("online-users".into(), sql.online_users.clone()),
        ("user-session".into(), sql.user_session.clone()),
        ("add-member".into(), sql.add_member.clone()),
        ("remove-member".into(), sql.remove_member.clone()),
        ("group-members".into(), sql.group_members.clone()),
        ("connection-groups".into(), sql.connection_groups.clone()),
        ("enqueue".into(), sql.enqueue.clone()),
        ("pending".into(), sql.pending.clone()),
        ("durable-message".into(), sql.durable_message.clone()),
        ("acknowledge".into(), sql.acknowledge.clone()),
        ("record-attempt".into(), sql.record_attempt.clone()),
        ("attempts".into(), sql.attempts.clone()),
        ("purge-expired".into(), sql.purge_expired.clone()),
        ("pending-count".into(), sql.pending_count.clone()),
        ("reserve".into(), sql.reserve()),
        ("insert-chunk".into(), sql.insert_chunk.clone()),
        ("append".into(), sql.append.clone()),
        ("poll".into(), sql::poll_hubs(&sql, &["chat", "o'brien"])),
    ];
    out.extend(schema::migration_batches(options, SAMPLE_HUB));
    out.push(("ddl".into(), schema::ddl(options)));
    if options.tables_per_hub
        && let Ok(hub) = schema::hub_ddl(options, SAMPLE_HUB)
    {
        out.push(("hub-ddl".into(), hub));
    }
    out.into_iter()
        .map(|(name, text)| Statement {
            name: file_name(&name),
            text,
        })
        .collect()
}

/// `name` with every character but ASCII letters, digits and `-` turned into `-`, lowercase.
fn file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option_sets() -> Vec<MssqlOptions> {
        let base = MssqlOptions::new("h", "u", "p");
        vec![
            base.clone(),
            base.clone().schema("we]ird sch'ema").table_prefix("p]("),
            base.clone().tables_per_hub(true),
            base.schema("we]ird sch'ema")
                .table_prefix("p](")
                .tables_per_hub(true),
        ]
    }

    #[test]
    fn names_are_unique_and_safe() {
        for options in option_sets() {
            let statements = render(&options);
            let mut names: Vec<&str> = statements.iter().map(|s| s.name.as_str()).collect();
            let count = names.len();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), count, "{names:?}");
            for name in names {
                assert!(
                    name.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn every_layout_renders_its_tables() {
        let [default, weird, per_hub, _] = option_sets().try_into().expect("four option sets");
        let find = |options: &MssqlOptions, name: &str| {
            render(options)
                .into_iter()
                .find(|s| s.name == name)
                .map(|s| s.text)
                .unwrap_or_default()
        };
        assert!(find(&default, "read").contains("[backplane].[log]"));
        assert!(find(&weird, "read").contains("[we]]ird sch'ema].[p]](log]"));
        assert!(find(&per_hub, "hub-ddl").contains("CREATE TABLE"));
        assert!(find(&default, "hub-ddl").is_empty());
    }
}
