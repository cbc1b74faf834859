//! Schema management against a real PostgreSQL: without automatic creation the driver refuses
//! to start and says how to fix it; the DDL it prints, run once by a DBA, is all it needs. With
//! tables per hub: each hub gets tables of its own, created once however many nodes use it
//! first, named safely, never shared, and cleaned up by nodes that never used the hub.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backplane_core::{
    Backplane, ConnectionId, ConnectionInfo, Error, GroupName, HubName, NewDurableMessage, NodeId,
    Retention, UserId,
};
use backplane_postgres::{PgBackplane, PgOptions, PgTableSetError};
use backplane_test_support::{Cluster, PG_URL_VAR};
use bytes::Bytes;
use tokio::sync::{Barrier, OnceCell};
use tokio_postgres::NoTls;

/// Every test finishes well within this, or fails.
const LIMIT: Duration = Duration::from_secs(90);

/// The cluster the tests of this file share, unless `BACKPLANE_TEST_PG_URL` names a database.
static CLUSTER: OnceCell<Result<Cluster, String>> = OnceCell::const_new();

async fn url() -> String {
    if let Some(url) = std::env::var(PG_URL_VAR).ok().filter(|u| !u.is_empty()) {
        return url;
    }
    let cluster = CLUSTER
        .get_or_init(|| async {
            let cluster = tokio::task::spawn_blocking(Cluster::start)
                .await
                .map_err(|e| e.to_string())??;
            cluster.remove_at_exit();
            Ok(cluster)
        })
        .await;
    match cluster {
        Ok(cluster) => cluster.url(),
        Err(err) => panic!("no PostgreSQL for the tests: {err}"),
    }
}

/// A schema name no other test or run uses.
fn unique_schema(what: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{what}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&url().await, NoTls)
        .await
        .expect("admin connects");
    tokio::spawn(connection);
    client
}

async fn options(schema: &str) -> PgOptions {
    PgOptions::from_str(&url().await)
        .expect("valid url")
        .schema(schema)
        .pool_size(4)
}

async fn per_hub(schema: &str) -> PgOptions {
    options(schema).await.tables_per_hub(true)
}

async fn within<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, test)
        .await
        .expect("the test finishes in time")
}

/// The tables in `schema`, sorted.
async fn tables(admin: &tokio_postgres::Client, schema: &str) -> Vec<String> {
    admin
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = $1 ORDER BY 1",
            &[&schema],
        )
        .await
        .expect("tables listed")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn drop_schema(admin: &tokio_postgres::Client, schema: &str) {
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            schema.replace('"', "\"\"")
        ))
        .await
        .expect("schema dropped");
}

/// What `doctor` says about the schema version.
async fn schema_check(options: &PgOptions) -> Result<String, String> {
    backplane_postgres::doctor(options)
        .await
        .into_iter()
        .find(|check| check.name == "schema version")
        .expect("a schema check")
        .outcome
}

/// The table set error inside a driver error.
fn table_error(err: &Error) -> &PgTableSetError {
    match err {
        Error::Driver {
            source,
            transient: false,
            ..
        } => source
            .downcast_ref::<PgTableSetError>()
            .unwrap_or_else(|| panic!("not a table set error: {err}")),
        other => panic!("not a permanent driver error: {other}"),
    }
}

fn hub(name: &str) -> HubName {
    HubName::new(name).expect("valid hub")
}

fn connection(hub: &HubName, id: &str, user: &str, node: &NodeId) -> ConnectionInfo {
    ConnectionInfo {
        hub: hub.clone(),
        id: ConnectionId::new(id).expect("valid id"),
        user: Some(UserId::new(user).expect("valid user")),
        node: node.clone(),
        connected_at: std::time::SystemTime::now(),
    }
}

/// Appends, reads back, registers a connection in a group and stores a durable message: every
/// kind of table of a set, through the driver.
async fn exercise(backplane: &PgBackplane, hub: &HubName, node: &NodeId) {
    let records = [Bytes::from_static(b"one"), Bytes::from_static(b"two")];
    let at = backplane.append(hub, 0, &records).await.expect("append");
    let entries = backplane.read(hub, at, 10).await.expect("read");
    assert_eq!(
        entries.iter().map(|e| e.data.clone()).collect::<Vec<_>>(),
        records
    );
    let info = connection(hub, "c-1", "ada", node);
    backplane.add_connection(&info).await.expect("connection");
    let group = GroupName::new("g").expect("valid group");
    assert!(
        backplane
            .add_to_group(hub, &group, &info.id)
            .await
            .expect("join")
    );
    assert_eq!(
        backplane.group_members(hub, &group).await.expect("members"),
        vec![info.id.clone()]
    );
    let id = backplane
        .enqueue(&NewDurableMessage {
            hub: hub.clone(),
            user: info.user.clone().expect("a user"),
            sender: None,
            payload: Bytes::from_static(b"inbox"),
            ttl: Duration::from_secs(3600),
        })
        .await
        .expect("enqueue");
    backplane
        .record_attempt(hub, id, &info.id, None)
        .await
        .expect("attempt");
    assert_eq!(
        backplane.attempts(hub, id).await.expect("attempts").len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_for_dbas_when_creation_is_off() {
    within(async {
        let schema = unique_schema("Dba Managed");
        let options = options(&schema).await.create_schema(false);

        let err = PgBackplane::connect_with(options.clone())
            .await
            .expect_err("no schema yet");
        let text = err.to_string();
        assert!(text.contains("version 0") && text.contains("DDL"), "{text}");

        let admin = admin().await;
        admin
            .batch_execute(&PgBackplane::ddl(&options))
            .await
            .expect("the printed DDL runs");

        let backplane = PgBackplane::connect_with(options)
            .await
            .expect("connects once the DBA ran the DDL");
        assert_eq!(backplane.schema_version().await.expect("version"), 1);
        exercise(&backplane, &hub("chat"), &NodeId::new("n1").expect("node")).await;
        drop_schema(&admin, &schema).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_get_tables_of_their_own() {
    within(async {
        let schema = unique_schema("per_hub");
        let admin = admin().await;
        let backplane = PgBackplane::connect_with(per_hub(&schema).await)
            .await
            .expect("connects");
        assert_eq!(
            tables(&admin, &schema).await,
            ["hubs", "migrations", "nodes"],
            "no hub has tables before it is used"
        );
        let node = NodeId::new("n1").expect("node");
        // Names that differ only in case get different tables.
        let (lower, upper) = (hub("chat"), hub("Chat"));
        exercise(&backplane, &lower, &node).await;
        exercise(&backplane, &upper, &node).await;

        let registry = admin
            .query(
                &format!("SELECT hub, slug FROM \"{schema}\".hubs ORDER BY hub"),
                &[],
            )
            .await
            .expect("registry");
        let slugs: Vec<(String, String)> = registry.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(slugs.len(), 2, "{slugs:?}");
        assert_eq!(slugs[0].0, "Chat");
        assert_eq!(slugs[1].0, "chat");
        assert_ne!(slugs[0].1, slugs[1].1);
        let mut expected = vec![
            "hubs".to_owned(),
            "migrations".to_owned(),
            "nodes".to_owned(),
        ];
        for (_, slug) in &slugs {
            assert!(slug.starts_with("chat_"), "{slug}");
            for table in [
                "attempts",
                "connections",
                "log",
                "memberships",
                "messages",
                "sessions",
                "streams",
            ] {
                expected.push(format!("{slug}_{table}"));
            }
        }
        expected.sort();
        assert_eq!(tables(&admin, &schema).await, expected);

        // Each hub's rows are in its own tables only.
        for (hub, slug) in &slugs {
            let rows = admin
                .query(
                    &format!("SELECT DISTINCT hub FROM \"{schema}\".\"{slug}_connections\""),
                    &[],
                )
                .await
                .expect("connections");
            let hubs: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            assert_eq!(hubs, std::slice::from_ref(hub));
        }
        // One migration row per table set, beside the shared tables' own.
        let scopes = admin
            .query(
                &format!("SELECT scope, version FROM \"{schema}\".migrations ORDER BY scope"),
                &[],
            )
            .await
            .expect("migrations");
        let scopes: Vec<(String, i32)> = scopes.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(
            scopes,
            [
                (format!("hub/{}", slugs[0].1), 1),
                (format!("hub/{}", slugs[1].1), 1),
                ("shared".to_owned(), 1),
                ("shared".to_owned(), 2)
            ]
        );
        let version = schema_check(&per_hub(&schema).await).await;
        assert_eq!(
            version,
            Ok("version 2, up to date; 2 hubs with tables of their own".to_owned())
        );
        drop(backplane);
        drop_schema(&admin, &schema).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_slugs_and_edge_hub_names_are_quoted() {
    within(async {
        // Hub names are ASCII letters, digits, `-`, `_` and `.` (the core refuses the rest); a
        // custom slug can be any text, and lands in table names as it is.
        for bad in ["a\"b", "a b", "ü", "x'; DROP TABLE nodes; --"] {
            assert!(HubName::new(bad).is_err(), "{bad}");
        }
        let schema = unique_schema("Odd Slugs");
        let admin = admin().await;
        let slugs = [
            ("quote", "it's \"quoted\""),
            ("space", "with  spaces"),
            ("unicode", "ünïcødé 漢字"),
            ("inject", "x\"; DROP TABLE nodes; --"),
            ("literal", "a\\'; DROP TABLE hubs; --"),
        ];
        let slug_of = move |hub: &str| {
            slugs
                .iter()
                .find(|(h, _)| *h == hub)
                .map_or_else(|| format!("other {hub}"), |(_, s)| (*s).to_owned())
        };
        let backplane = PgBackplane::connect_with(
            options(&schema)
                .await
                .table_prefix("p\u{e9}_")
                .table_slug(slug_of),
        )
        .await
        .expect("connects");
        let node = NodeId::new("n1").expect("node");
        for (name, slug) in slugs {
            exercise(&backplane, &hub(name), &node).await;
            let present = tables(&admin, &schema).await;
            for table in ["streams", "log", "memberships"] {
                let expected = format!("p\u{e9}_{slug}_{table}");
                assert!(present.contains(&expected), "{expected} in {present:?}");
            }
        }
        // Dots, dashes and the longest hub name, with the default slug.
        let backplane = PgBackplane::connect_with(per_hub(&unique_schema("edge")).await)
            .await
            .expect("connects");
        let longest = format!("{}.x", "A-".repeat(31));
        assert_eq!(longest.len(), HubName::MAX_LEN);
        for name in ["a.b", "a-b", "a_b", "A_B", longest.as_str()] {
            exercise(&backplane, &hub(name), &node).await;
        }
        drop_schema(&admin, &schema).await;
        drop_schema(&admin, backplane.options().get_schema()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubless_calls_cover_hubs_this_node_never_used() {
    within(async {
        let schema = unique_schema("cleanup");
        let admin = admin().await;
        let user = PgBackplane::connect_with(per_hub(&schema).await)
            .await
            .expect("connects");
        let dead = NodeId::new("dead-node").expect("node");
        let room = hub("room");
        user.register_node(&dead, None).await.expect("node");
        let info = connection(&room, "c-1", "ada", &dead);
        user.add_connection(&info).await.expect("connection");
        let group = GroupName::new("g").expect("valid group");
        user.add_to_group(&room, &group, &info.id)
            .await
            .expect("join");
        let records: Vec<Bytes> = (0..10u8).map(|i| Bytes::from(vec![i])).collect();
        let first = user.append(&room, 1, &records).await.expect("append");
        let message = |ttl| NewDurableMessage {
            hub: room.clone(),
            user: UserId::new("bob").expect("user"),
            sender: None,
            payload: Bytes::from_static(b"m"),
            ttl,
        };
        user.enqueue(&message(Duration::ZERO))
            .await
            .expect("expired message");
        user.enqueue(&message(Duration::from_secs(3600)))
            .await
            .expect("pending message");

        // Another node, on a new handle, has never used the hub.
        let other = PgBackplane::connect_with(per_hub(&schema).await)
            .await
            .expect("connects");
        assert_eq!(other.pending_count().await.expect("count"), 1);
        assert_eq!(other.purge_expired().await.expect("purge"), 1);
        assert_eq!(
            other
                .trim(&Retention {
                    max_age: Duration::from_secs(3600),
                    max_entries: 3,
                })
                .await
                .expect("trim"),
            7
        );
        let reaped = other.reap_nodes(Duration::ZERO).await.expect("reap");
        assert_eq!(reaped, vec![dead.clone()]);

        assert_eq!(
            user.connection(&room, &info.id).await.expect("lookup"),
            None
        );
        assert!(
            user.group_members(&room, &group)
                .await
                .expect("members")
                .is_empty()
        );
        let session = user
            .user_session(&room, &UserId::new("ada").expect("user"))
            .await
            .expect("session")
            .expect("a session");
        assert_eq!(session.connections, 0);
        assert!(session.ended_at.is_some());
        let err = user.read(&room, first, 10).await.expect_err("trimmed");
        assert!(matches!(err, Error::PositionTooOld { .. }), "{err}");

        // Unregistering a node removes its connections in every hub, too.
        let leaving = NodeId::new("leaving").expect("node");
        user.register_node(&leaving, None).await.expect("node");
        let second = hub("second");
        let info = connection(&second, "c-2", "eve", &leaving);
        user.add_connection(&info).await.expect("connection");
        other.unregister_node(&leaving).await.expect("unregister");
        assert_eq!(
            user.connection(&second, &info.id).await.expect("lookup"),
            None
        );
        drop((user, other));
        drop_schema(&admin, &schema).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_use_of_a_new_hub_creates_it_once() {
    within(async {
        const NODES: usize = 8;
        let schema = unique_schema("race");
        let admin = admin().await;
        let barrier = Arc::new(Barrier::new(NODES));
        let fresh = hub("fresh");
        let mut tasks = Vec::new();
        for _ in 0..NODES {
            let (options, barrier, fresh) = (
                per_hub(&schema).await.pool_size(2),
                barrier.clone(),
                fresh.clone(),
            );
            tasks.push(tokio::spawn(async move {
                // The database is empty: the nodes also race to create the shared tables.
                let backplane = PgBackplane::connect_with(options).await?;
                barrier.wait().await;
                let at = backplane
                    .append(&fresh, 0, &[Bytes::from_static(b"x")])
                    .await?;
                Ok::<_, Error>((backplane, at.offset))
            }));
        }
        let mut offsets = Vec::new();
        let mut handles = Vec::new();
        for task in tasks {
            let (backplane, offset) = task.await.expect("task").expect("first use succeeds");
            offsets.push(offset);
            handles.push(backplane);
        }
        offsets.sort_unstable();
        assert_eq!(offsets, (0..NODES as u64).collect::<Vec<_>>());
        let count = |sql: String| {
            let admin = &admin;
            async move {
                let row = admin.query_one(&sql, &[]).await.expect("count");
                row.get::<_, i64>(0)
            }
        };
        assert_eq!(
            count(format!("SELECT count(*) FROM \"{schema}\".hubs")).await,
            1
        );
        assert_eq!(
            count(format!(
                "SELECT count(*) FROM \"{schema}\".migrations WHERE scope LIKE 'hub/%'"
            ))
            .await,
            1
        );
        assert_eq!(
            count(format!(
                "SELECT count(*) FROM information_schema.tables
                 WHERE table_schema = '{schema}' AND table_name LIKE '%\\_streams'"
            ))
            .await,
            1
        );
        drop(handles);
        drop_schema(&admin, &schema).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slug_clashes_and_bad_slugs_are_errors() {
    within(async {
        let schema = unique_schema("clash");
        let admin = admin().await;
        let node = NodeId::new("n1").expect("node");
        let lowercase = PgBackplane::connect_with(
            options(&schema)
                .await
                .table_slug(|hub| hub.to_ascii_lowercase()),
        )
        .await
        .expect("connects");
        exercise(&lowercase, &hub("Chat"), &node).await;
        let err = lowercase
            .append(&hub("chat"), 0, &[Bytes::from_static(b"x")])
            .await
            .expect_err("the slug is taken");
        assert_eq!(
            table_error(&err),
            &PgTableSetError::SlugTaken {
                hub: "chat".into(),
                slug: "chat".into(),
                other: "Chat".into()
            }
        );
        assert!(err.to_string().contains("\"Chat\""), "{err}");
        // Still an error on the next call: the clash is never cached as a success.
        assert!(lowercase.online_users(&hub("chat")).await.is_err());
        assert_eq!(
            lowercase
                .online_users(&hub("Chat"))
                .await
                .expect("the first hub works"),
            vec![UserId::new("ada").expect("user")]
        );

        // A node with another slug function finds the hub registered under the first.
        let other =
            PgBackplane::connect_with(options(&schema).await.table_slug(|hub| format!("x_{hub}")))
                .await
                .expect("connects");
        let err = other
            .online_users(&hub("Chat"))
            .await
            .expect_err("another slug");
        assert!(
            matches!(table_error(&err), PgTableSetError::SlugChanged { hub, registered, slug }
                if hub == "Chat" && registered == "chat" && slug == "x_Chat"),
            "{err}"
        );

        // Too long and empty slugs fail the hub's first use and create nothing.
        let long = PgBackplane::connect_with(
            options(&schema)
                .await
                .table_prefix("pre_")
                .table_slug(|hub| hub.repeat(20)),
        )
        .await
        .expect("connects");
        let err = long
            .append(&hub("long"), 0, &[Bytes::from_static(b"x")])
            .await
            .expect_err("too long");
        assert!(
            matches!(table_error(&err), PgTableSetError::NameTooLong { hub, bytes, .. }
                if hub == "long" && *bytes == 4 + 80 + 12),
            "{err}"
        );
        let empty = PgBackplane::connect_with(
            options(&schema)
                .await
                .table_prefix("pre_")
                .table_slug(|_| String::new()),
        )
        .await
        .expect("connects");
        let err = empty
            .tail(&hub("empty"), 0)
            .await
            .expect_err("an empty slug");
        assert!(
            matches!(table_error(&err), PgTableSetError::EmptySlug { hub } if hub == "empty"),
            "{err}"
        );
        let registry = admin
            .query(&format!("SELECT hub FROM \"{schema}\".pre_hubs"), &[])
            .await
            .expect("registry");
        assert!(registry.is_empty());
        drop((lowercase, other, long, empty));
        drop_schema(&admin, &schema).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_hub_tables_without_creation_name_the_hub() {
    within(async {
        let schema = unique_schema("dba_hubs");
        let admin = admin().await;
        let options = per_hub(&schema)
            .await
            .create_schema(false)
            .table_slug(|hub| format!("{hub} it's \"{hub}\""));
        let err = PgBackplane::connect_with(options.clone())
            .await
            .expect_err("no schema yet");
        assert!(err.to_string().contains("version 0"), "{err}");
        admin
            .batch_execute(&PgBackplane::ddl(&options))
            .await
            .expect("the shared DDL runs");
        let backplane = PgBackplane::connect_with(options.clone())
            .await
            .expect("connects once the shared tables exist");
        let chat = hub("chat");
        let err = backplane
            .append(&chat, 0, &[Bytes::from_static(b"x")])
            .await
            .expect_err("the hub's tables are missing");
        assert_eq!(
            table_error(&err),
            &PgTableSetError::Missing {
                hub: "chat".into(),
                version: 0,
                needed: 1
            }
        );
        let text = err.to_string();
        assert!(
            text.contains("\"chat\"") && text.contains("hub_ddl"),
            "{text}"
        );
        // No hub has tables yet: the calls that span hubs have nothing to do.
        assert_eq!(backplane.pending_count().await.expect("count"), 0);

        admin
            .batch_execute(&PgBackplane::hub_ddl(&options, &chat).expect("hub DDL"))
            .await
            .expect("the hub's DDL runs");
        exercise(&backplane, &chat, &NodeId::new("n1").expect("node")).await;
        assert_eq!(backplane.pending_count().await.expect("count"), 1);
        assert!(
            tables(&admin, &schema)
                .await
                .contains(&"chat it's \"chat\"_log".to_owned())
        );
        drop(backplane);
        drop_schema(&admin, &schema).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layouts_do_not_mix_under_one_prefix() {
    within(async {
        let schema = unique_schema("layouts");
        let admin = admin().await;
        let shared = PgBackplane::connect_with(options(&schema).await)
            .await
            .expect("connects");
        let err = PgBackplane::connect_with(per_hub(&schema).await)
            .await
            .expect_err("the other layout");
        assert!(
            matches!(
                table_error(&err),
                PgTableSetError::LayoutMismatch {
                    tables_per_hub: true,
                    ..
                }
            ),
            "{err}"
        );
        // Another prefix in the same schema is fine.
        let per_hub = PgBackplane::connect_with(per_hub(&schema).await.table_prefix("h_"))
            .await
            .expect("connects");
        exercise(&per_hub, &hub("chat"), &NodeId::new("n1").expect("node")).await;
        let err = PgBackplane::connect_with(options(&schema).await.table_prefix("h_"))
            .await
            .expect_err("the other layout");
        assert!(
            matches!(
                table_error(&err),
                PgTableSetError::LayoutMismatch {
                    tables_per_hub: false,
                    ..
                }
            ),
            "{err}"
        );
        let version = schema_check(&options(&schema).await.table_prefix("h_")).await;
        assert!(
            version
                .as_ref()
                .is_err_and(|e| e.contains("tables_per_hub=false")),
            "{version:?}"
        );
        drop((shared, per_hub));
        drop_schema(&admin, &schema).await;
    })
    .await;
}
