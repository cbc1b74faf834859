//! Which table set serves a hub: the one every hub shares, or, with tables per hub, the hub's
//! own, created on first use and cached per node.

use std::sync::Arc;

use backplane_core::schema::HubTables;
use backplane_core::{HubName, Result};

use crate::MssqlBackplane;
use crate::conn::Conn;
use crate::names::{self, SetNames};
use crate::options::MssqlOptions;
use crate::schema;
use crate::sql::Sql;

/// A table set's names and its statements, rendered once.
#[derive(Debug)]
pub(crate) struct TableSet {
    pub(crate) names: SetNames,
    pub(crate) sql: Sql,
}

impl TableSet {
    pub(crate) fn new(names: SetNames) -> Self {
        let sql = Sql::new(&names);
        Self { names, sql }
    }
}

/// How a node finds a hub's tables.
#[derive(Debug)]
pub(crate) enum Layout {
    /// One table set for every hub.
    Shared(Arc<TableSet>),
    /// A table set per hub.
    PerHub(PerHub),
}

/// The table sets this node knows, with tables per hub.
pub(crate) type PerHub = HubTables<TableSet>;

/// The rendered set of the hub whose slug is `slug`.
fn hub_set(per_hub: &PerHub, options: &MssqlOptions, slug: &str) -> Arc<TableSet> {
    per_hub.set(slug, || TableSet::new(SetNames::hub(options, slug)))
}

impl MssqlBackplane {
    /// The table set of `hub`: the shared one, or with tables per hub the hub's own, made sure
    /// to exist on the first call for the hub on this node.
    pub(crate) async fn tables(&self, hub: &HubName) -> Result<Arc<TableSet>> {
        let per_hub = match &self.inner().layout {
            Layout::Shared(set) => return Ok(set.clone()),
            Layout::PerHub(per_hub) => per_hub,
        };
        per_hub
            .get_or_try_init(hub, || async {
                let options = &self.inner().options;
                let slug = names::slug(options, hub.as_str())?;
                let mut conn = self.conn().await?;
                schema::ensure_hub_set(
                    &mut conn,
                    options,
                    &self.inner().names,
                    hub.as_str(),
                    &slug,
                )
                .await?;
                Ok(hub_set(per_hub, options, &slug))
            })
            .await
    }

    /// Every table set, for the calls that span hubs: with tables per hub, those of every hub in
    /// the registry. A set behind the latest version is migrated first when this node may
    /// create tables, and skipped with a warning otherwise.
    pub(crate) async fn all_tables(&self, conn: &mut Conn) -> Result<Vec<Arc<TableSet>>> {
        let per_hub = match &self.inner().layout {
            Layout::Shared(set) => return Ok(vec![set.clone()]),
            Layout::PerHub(per_hub) => per_hub,
        };
        let options = &self.inner().options;
        let names = &self.inner().names;
        let mut sets = Vec::new();
        for (hub, slug, version) in schema::registered_hubs(conn, names).await? {
            if version < schema::latest_set() {
                if !options.create_schema {
                    tracing::warn!(
                        %hub,
                        version,
                        needed = schema::latest_set(),
                        "skipping a hub whose tables are missing or old: run its DDL"
                    );
                    continue;
                }
                schema::ensure_hub_set(conn, options, names, &hub, &slug).await?;
            }
            sets.push(hub_set(per_hub, options, &slug));
        }
        Ok(sets)
    }
}
