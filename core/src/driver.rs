//! What a driver offers to be picked by URL: the schemes it takes, and how to connect, write
//! its DDL and check a database from a URL alone. `backplane-drivers` lists the drivers that
//! implement it; the server and the conformance runner go through that list.

use async_trait::async_trait;

use crate::{Backplane, HubName, Result};

/// One check of a driver's `doctor`: what was checked, and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// What was found, or what is wrong and how to fix it.
    pub outcome: std::result::Result<String, String>,
}

impl Check {
    /// A check named `name` with its outcome.
    pub fn new(name: &'static str, outcome: std::result::Result<String, String>) -> Self {
        Self { name, outcome }
    }
}

/// A backplane that can be opened from a URL.
///
/// # Examples
///
/// ```
/// use backplane_core::{Driver, MemoryBackplane};
///
/// assert!(MemoryBackplane::accepts("memory://"));
/// assert!(!MemoryBackplane::accepts("postgres://db/app"));
/// ```
#[async_trait]
pub trait Driver: Backplane + Sized {
    /// The driver's name, as [`Backplane::driver_name`] reports it.
    const NAME: &'static str;
    /// The URL schemes that select this driver, lower case.
    const URL_SCHEMES: &'static [&'static str];
    /// What its URLs look like, for help texts.
    const URL_FORMS: &'static str;

    /// Whether `url` is one of this driver's: its scheme is one of
    /// [`URL_SCHEMES`](Self::URL_SCHEMES), in any case, or it is a
    /// [connection string](Self::is_connection_string) of the driver's.
    fn accepts(url: &str) -> bool {
        match url_scheme(url) {
            Some(scheme) => Self::URL_SCHEMES
                .iter()
                .any(|known| known.eq_ignore_ascii_case(scheme)),
            None => Self::is_connection_string(url),
        }
    }

    /// Whether `url`, which has no scheme, is a connection string this driver takes (as SQL
    /// Server's ADO.NET `Server=…;…`). None by default.
    fn is_connection_string(_url: &str) -> bool {
        false
    }

    /// Opens the backplane `url` names.
    ///
    /// # Errors
    ///
    /// An invalid URL, or a database that cannot be reached or prepared.
    async fn connect_url(url: &str) -> Result<Self>;

    /// The DDL a DBA runs for the backplane `url` names, serving `hubs` (which matters to
    /// drivers that give each hub tables of its own).
    ///
    /// # Errors
    ///
    /// An invalid URL, a driver without a schema, or a hub name the driver cannot use.
    fn ddl_url(url: &str, hubs: &[HubName]) -> Result<String>;

    /// Checks that the database at `url` has what the driver needs. Never fails on a problem
    /// found: that is a failed [`Check`].
    ///
    /// # Errors
    ///
    /// An invalid URL.
    async fn doctor_url(url: &str) -> Result<Vec<Check>>;
}

/// The DDL of a driver whose hubs may have tables of their own: `shared`, then, when `per_hub`,
/// each of `hubs`' from `hub_ddl`.
///
/// # Errors
///
/// The first error of `hub_ddl`.
pub fn ddl_for_hubs(
    shared: String,
    per_hub: bool,
    hubs: &[HubName],
    hub_ddl: impl Fn(&HubName) -> Result<String>,
) -> Result<String> {
    let mut sql = shared;
    if per_hub {
        for hub in hubs {
            sql.push('\n');
            sql.push_str(&hub_ddl(hub)?);
        }
    }
    Ok(sql)
}

/// The scheme of `url` (`postgres` in `postgres://…`), or `None` when it has none.
pub fn url_scheme(url: &str) -> Option<&str> {
    let (scheme, _) = url.split_once("://")?;
    let valid = scheme
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(scheme)
}

#[cfg(test)]
mod tests {
    use super::url_scheme;

    #[test]
    fn a_scheme_is_what_comes_before_its_separator() {
        assert_eq!(url_scheme("postgres://u@h/db"), Some("postgres"));
        assert_eq!(url_scheme("memory://"), Some("memory"));
        assert_eq!(url_scheme("Server=h;Password=a://b"), None);
        assert_eq!(url_scheme("://nothing"), None);
        assert_eq!(url_scheme("plain"), None);
    }
}
