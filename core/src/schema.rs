//! What SQL drivers share about their tables: hub table slugs, migration templates, the
//! versions recorded in a migrations table, and the per-node cache of hubs' table sets.
//!
//! A SQL driver keeps its tables in two parts, each versioned on its own: the shared tables
//! (nodes, a registry of hubs) and table sets (streams, log, connections, …), either one set
//! that every hub shares or, with tables per hub, one set per hub named by the hub's slug.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tokio::sync::OnceCell;

use crate::name::HubName;

/// A 64-bit FNV-1a hash: stable across processes, platforms and versions, for names that
/// every node must compute alike.
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The default table slug of a hub: the name lowercased, every character outside
/// `[a-z0-9_]` turned into `_`, cut to `stem` bytes, then `_` and 8 hex digits of a hash of the
/// exact name, so names that differ only in case or past the cut still get tables of their own.
///
/// # Examples
///
/// ```
/// use backplane_core::schema::default_table_slug;
///
/// let slug = default_table_slug("Chat.Room", 22);
/// assert!(slug.starts_with("chat_room_"));
/// assert_ne!(slug, default_table_slug("chat.room", 22));
/// ```
pub fn default_table_slug(hub: &str, stem: usize) -> String {
    let mut slug: String = hub
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(stem)
        .collect();
    let hash = stable_hash(hub);
    slug.push_str(&format!("_{:08x}", (hash ^ (hash >> 32)) & 0xffff_ffff));
    slug
}

/// A custom function from a hub name to the slug in its table names.
#[derive(Clone)]
pub struct TableSlug(Arc<dyn Fn(&str) -> String + Send + Sync + 'static>);

impl TableSlug {
    /// Wraps a slug function.
    pub fn new(slug: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        Self(Arc::new(slug))
    }

    /// The slug of `hub`.
    pub fn slug(&self, hub: &str) -> String {
        (self.0)(hub)
    }
}

impl fmt::Debug for TableSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<custom>")
    }
}

/// Replaces each `{name}` placeholder of a migration in one pass, so a value that looks like a
/// placeholder stays as it is.
///
/// # Examples
///
/// ```
/// use backplane_core::schema::render;
///
/// assert_eq!(render("{a}.{b} {c}", &[("{a}", "{b}"), ("{b}", "x")]), "{b}.x {c}");
/// ```
pub fn render(sql: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(sql.len() + 256);
    let mut rest = sql;
    'scan: while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        for (placeholder, value) in values {
            if let Some(after) = rest.strip_prefix(placeholder) {
                out.push_str(value);
                rest = after;
                continue 'scan;
            }
        }
        out.push('{');
        rest = &rest[1..];
    }
    out.push_str(rest);
    out
}

/// What a migrations table says about one schema and prefix.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Versions {
    /// The shared tables' version, 0 when none.
    pub shared: i32,
    /// The version of the table set every hub shares, 0 when none.
    pub default_set: i32,
    /// Whether any hub has a table set of its own.
    pub hub_sets: bool,
}

impl Versions {
    /// The schema version for a layout: the shared tables' with tables per hub (each hub's set
    /// is checked on its first use), else the lower of the shared tables' and the shared set's.
    pub fn version(&self, per_hub: bool) -> i32 {
        if per_hub {
            self.shared
        } else {
            self.shared.min(self.default_set)
        }
    }

    /// Whether the tables are those of the other layout.
    pub fn other_layout(&self, per_hub: bool) -> bool {
        if per_hub {
            self.default_set > 0
        } else {
            self.hub_sets
        }
    }

    /// Whether a migration of this layout is missing, given the latest versions.
    pub fn behind(&self, per_hub: bool, latest_shared: i32, latest_set: i32) -> bool {
        self.shared < latest_shared || (!per_hub && self.default_set < latest_set)
    }
}

/// The version a driver needs for a layout, given its latest versions.
pub fn latest_version(per_hub: bool, latest_shared: i32, latest_set: i32) -> i32 {
    if per_hub {
        latest_shared
    } else {
        latest_shared.min(latest_set)
    }
}

/// The table sets a node knows, with tables per hub: `T` is a driver's rendered set. Locks
/// here are never held across an await.
#[derive(Debug)]
pub struct HubTables<T> {
    /// Hubs this node has used: the cell fills once the hub's tables are known to exist, and
    /// stays empty after a failure, so the next call tries again.
    hubs: RwLock<HashMap<HubName, Arc<OnceCell<Arc<T>>>>>,
    /// Rendered sets by slug, shared by hubs this node used and hubs it only found in the
    /// registry.
    by_slug: Mutex<HashMap<String, Arc<T>>>,
}

impl<T> Default for HubTables<T> {
    fn default() -> Self {
        Self {
            hubs: RwLock::default(),
            by_slug: Mutex::default(),
        }
    }
}

impl<T> HubTables<T> {
    /// The cell of `hub`'s set, empty until the hub's tables are known to exist.
    pub fn cell(&self, hub: &HubName) -> Arc<OnceCell<Arc<T>>> {
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

    /// `hub`'s set: the one this node already knows, or the one `init` makes sure exists.
    /// Concurrent first calls for a hub run `init` once; a failure is not kept, so the next
    /// call tries again.
    ///
    /// # Errors
    ///
    /// What `init` failed with.
    pub async fn get_or_try_init<E, F, Fut>(&self, hub: &HubName, init: F) -> Result<Arc<T>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Arc<T>, E>>,
    {
        let cell = self.cell(hub);
        if let Some(set) = cell.get() {
            return Ok(set.clone());
        }
        cell.get_or_try_init(init).await.cloned()
    }

    /// The set with this slug, made by `make` on first request.
    pub fn set(&self, slug: &str, make: impl FnOnce() -> T) -> Arc<T> {
        self.by_slug
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(slug.to_owned())
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_slugs_are_safe_distinct_and_stable() {
        let long = "x".repeat(64);
        let hubs = ["chat", "Chat", "CHAT", "a.b", "a-b", "a_b", long.as_str()];
        let slugs: Vec<String> = hubs.iter().map(|h| default_table_slug(h, 22)).collect();
        for (hub, slug) in hubs.iter().zip(&slugs) {
            assert!(slug.len() <= 22 + 9, "{hub}: {slug}");
            assert!(
                slug.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{hub}: {slug}"
            );
        }
        let mut unique = slugs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), slugs.len(), "{slugs:?}");
        assert_eq!(
            default_table_slug("chat", 22),
            default_table_slug("chat", 22)
        );
        // Pinned: every node of a deployment, of any version, computes the same tables.
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn versions_per_layout() {
        let shared_only = Versions {
            shared: 1,
            default_set: 0,
            hub_sets: true,
        };
        assert_eq!(shared_only.version(true), 1);
        assert_eq!(shared_only.version(false), 0);
        assert!(shared_only.other_layout(false));
        assert!(!shared_only.other_layout(true));
        assert!(!shared_only.behind(true, 1, 1));
        assert!(shared_only.behind(false, 1, 1));
        assert_eq!(latest_version(true, 2, 3), 2);
        assert_eq!(latest_version(false, 2, 3), 2);
    }

    #[test]
    fn hub_tables_share_sets_by_slug() {
        let tables: HubTables<String> = HubTables::default();
        let hub = HubName::new("chat").expect("valid");
        assert!(Arc::ptr_eq(&tables.cell(&hub), &tables.cell(&hub)));
        let a = tables.set("s", || "first".to_owned());
        let b = tables.set("s", || "second".to_owned());
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(*b, "first");
    }
}
