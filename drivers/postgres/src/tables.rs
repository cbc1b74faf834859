//! Which table set serves a hub: the one every hub shares, or, with tables per hub, the hub's
//! own, created on first use and cached per node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use backplane_core::{HubName, Result};
use tokio::sync::OnceCell;

use crate::PgBackplane;
use crate::options::PgOptions;
use crate::schema::{self, SetNames};
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

/// The table sets this node knows, with tables per hub. Locks here are never held across an
/// await.
#[derive(Debug, Default)]
pub(crate) struct PerHub {
    /// Hubs this node has used: the cell fills once the hub's tables are known to exist, and
    /// stays empty after a failure, so the next call tries again.
    hubs: RwLock<HashMap<HubName, Arc<OnceCell<Arc<TableSet>>>>>,
    /// Rendered sets by slug, shared by hubs this node used and hubs it only found in the
    /// registry.
    by_slug: Mutex<HashMap<String, Arc<TableSet>>>,
}

impl PerHub {
    fn cell(&self, hub: &HubName) -> Arc<OnceCell<Arc<TableSet>>> {
        if let Some(cell) = self
            .hubs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(hub)
        {
            return cell.clone();
        }
        self.hubs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(hub.clone())
            .or_default()
            .clone()
    }

    /// The set with this slug, rendered on first request.
    fn set(&self, options: &PgOptions, slug: &str) -> Arc<TableSet> {
        let mut sets = self.by_slug.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(set) = sets.get(slug) {
            return set.clone();
        }
        let set = Arc::new(TableSet::new(SetNames::hub(options, slug)));
        sets.insert(slug.to_owned(), set.clone());
        set
    }
}

impl PgBackplane {
    /// The table set of `hub`. By default, the one every hub shares. With tables per hub, the
    /// hub's own: the first call for a hub on this node makes sure its tables exist (creating
    /// them when allowed); later calls cost a map lookup.
    ///
    /// Takes a pooled connection only while it sets up a hub, and returns it before the caller
    /// takes its own.
    pub(crate) async fn tables(&self, hub: &HubName) -> Result<Arc<TableSet>> {
        let per_hub = match &self.inner().layout {
            Layout::Shared(set) => return Ok(set.clone()),
            Layout::PerHub(per_hub) => per_hub,
        };
        let cell = per_hub.cell(hub);
        if let Some(set) = cell.get() {
            return Ok(set.clone());
        }
        cell.get_or_try_init(|| async {
            let options = &self.inner().options;
            let slug = schema::slug(options, hub.as_str())?;
            let mut client = self.client().await?;
            schema::ensure_hub_set(
                &mut client,
                options,
                &self.inner().names,
                hub.as_str(),
                &slug,
            )
            .await?;
            Ok(per_hub.set(options, &slug))
        })
        .await
        .cloned()
    }

    /// Every table set, for the calls that span hubs: with tables per hub, those of every hub in
    /// the registry, including hubs this node never used. A set behind the latest version is
    /// migrated first when this node may create tables, and skipped with a warning otherwise.
    pub(crate) async fn all_tables(
        &self,
        client: &mut tokio_postgres::Client,
    ) -> Result<Vec<Arc<TableSet>>> {
        let per_hub = match &self.inner().layout {
            Layout::Shared(set) => return Ok(vec![set.clone()]),
            Layout::PerHub(per_hub) => per_hub,
        };
        let options = &self.inner().options;
        let names = &self.inner().names;
        let mut sets = Vec::new();
        for (hub, slug, version) in schema::registered_hubs(&*client, names).await? {
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
                schema::ensure_hub_set(client, options, names, &hub, &slug).await?;
            }
            sets.push(per_hub.set(options, &slug));
        }
        Ok(sets)
    }
}
