#![doc = include_str!("../README.md")]
#![deny(rustdoc::broken_intra_doc_links)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use backplane_core::{Check, Driver, HubName, SharedBackplane, url_scheme};

/// Lists one driver: its cargo feature (which is also its name), what to call it in messages,
/// its type, its URL schemes, the function that makes its conformance factory for a
/// command-line run, and `connection_strings` when it also takes URLs without a scheme
/// (ADO.NET's `Server=…;…`). The type and the factory are only named when the feature is on;
/// the rest tells a URL for a driver left out of the build apart from one for no driver at all.
macro_rules! driver {
    (
        $feature:literal, $title:literal, $driver:ty, [$($scheme:literal),+],
        factory: $factory:path $(, $strings:ident)? $(,)?
    ) => {{
        #[cfg(feature = $feature)]
        const BUILT: Option<BuiltIn> = Some(BuiltIn::of::<$driver>());
        #[cfg(not(feature = $feature))]
        const BUILT: Option<BuiltIn> = None;
        #[cfg(all(feature = $feature, feature = "conformance"))]
        const FACTORY: Option<MakeFactory> = Some($factory);
        #[cfg(all(not(feature = $feature), feature = "conformance"))]
        const FACTORY: Option<MakeFactory> = None;
        KnownDriver {
            name: $feature,
            title: $title,
            schemes: &[$($scheme),+],
            connection_strings: driver!(@strings $($strings)?),
            built: BUILT,
            #[cfg(feature = "conformance")]
            factory: FACTORY,
        }
    }};
    (@strings connection_strings) => { true };
    (@strings) => { false };
}

/// Every driver this crate knows, built in or not. A new driver is one entry here (and its
/// feature in the manifest).
pub static DRIVERS: &[KnownDriver] = &[
    driver!(
        "memory",
        "memory",
        backplane_core::MemoryBackplane,
        ["memory"],
        factory: backplane_conformance::MemoryFactory::for_target
    ),
    driver!(
        "postgres",
        "PostgreSQL",
        backplane_postgres::PgBackplane,
        ["postgres", "postgresql"],
        factory: backplane_postgres::testing::PgFactory::for_target
    ),
    driver!(
        "mssql",
        "SQL Server",
        backplane_mssql::MssqlBackplane,
        ["mssql", "sqlserver"],
        factory: backplane_mssql::testing::MssqlFactory::for_target,
        connection_strings
    ),
];

/// What makes a driver's conformance factory for a command-line run.
#[cfg(feature = "conformance")]
type MakeFactory = fn(
    &backplane_conformance::TestDatabase<'_>,
) -> Result<Arc<dyn backplane_conformance::Factory>, String>;

/// One driver of [`DRIVERS`].
#[derive(Debug)]
pub struct KnownDriver {
    name: &'static str,
    title: &'static str,
    schemes: &'static [&'static str],
    connection_strings: bool,
    built: Option<BuiltIn>,
    #[cfg(feature = "conformance")]
    factory: Option<MakeFactory>,
}

impl KnownDriver {
    /// The driver's name, which is also the cargo feature that builds it in.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// What messages call it (`PostgreSQL`).
    pub fn title(&self) -> &'static str {
        self.title
    }

    /// The URL schemes that select it.
    pub fn schemes(&self) -> &'static [&'static str] {
        self.schemes
    }

    /// Whether this build has it.
    pub fn built_in(&self) -> bool {
        self.built.is_some()
    }

    /// What its URLs look like, when it is built in.
    pub fn url_forms(&self) -> Option<&'static str> {
        self.built.map(|b| b.forms)
    }

    /// Whether `url` is for this driver. A driver left out of the build knows only its
    /// schemes, and that it takes connection strings.
    fn accepts(&self, url: &str) -> bool {
        match self.built {
            Some(built) => (built.accepts)(url),
            None => match url_scheme(url) {
                Some(scheme) => self.schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme)),
                None => self.connection_strings && url.contains('='),
            },
        }
    }

    fn require(&'static self) -> Result<&'static BuiltIn, DriverError> {
        self.built.as_ref().ok_or(DriverError::NotBuiltIn {
            driver: self.title,
            feature: self.name,
        })
    }
}

type Opening<'a> =
    Pin<Box<dyn Future<Output = backplane_core::Result<SharedBackplane>> + Send + 'a>>;
type Checking<'a> = Pin<Box<dyn Future<Output = backplane_core::Result<Vec<Check>>> + Send + 'a>>;

/// A built-in driver's [`Driver`] functions, as plain function pointers.
#[derive(Clone, Copy)]
struct BuiltIn {
    name: &'static str,
    /// What the driver itself says its schemes are; a test checks [`DRIVERS`] against it.
    #[cfg_attr(not(test), allow(dead_code))]
    schemes: &'static [&'static str],
    forms: &'static str,
    accepts: fn(&str) -> bool,
    connect: for<'a> fn(&'a str) -> Opening<'a>,
    ddl: fn(&str, &[HubName]) -> backplane_core::Result<String>,
    doctor: for<'a> fn(&'a str) -> Checking<'a>,
}

impl std::fmt::Debug for BuiltIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltIn").field("name", &self.name).finish()
    }
}

impl BuiltIn {
    #[allow(dead_code)] // unused when the build has no driver at all
    const fn of<D: Driver + 'static>() -> Self {
        Self {
            name: D::NAME,
            schemes: D::URL_SCHEMES,
            forms: D::URL_FORMS,
            accepts: D::accepts,
            connect: connect_as::<D>,
            ddl: D::ddl_url,
            doctor: doctor_as::<D>,
        }
    }
}

#[allow(dead_code)]
fn connect_as<D: Driver + 'static>(url: &str) -> Opening<'_> {
    Box::pin(async move { Ok(Arc::new(D::connect_url(url).await?) as SharedBackplane) })
}

#[allow(dead_code)]
fn doctor_as<D: Driver + 'static>(url: &str) -> Checking<'_> {
    Box::pin(D::doctor_url(url))
}

/// Why a URL opened no backplane. No message quotes the URL: it may hold a password.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The URL is for a driver this build left out.
    #[error("the {driver} backplane is not built in: build with the cargo feature `{feature}`")]
    NotBuiltIn {
        /// The driver, as messages call it.
        driver: &'static str,
        /// The cargo feature that adds it.
        feature: &'static str,
    },
    /// No driver takes the URL's scheme.
    #[error("unknown backplane scheme '{scheme}': expected {expected}")]
    UnknownScheme {
        /// The scheme given.
        scheme: String,
        /// The schemes there are.
        expected: String,
    },
    /// Neither `scheme://…` nor a connection string.
    #[error(
        "malformed backplane URL: expected scheme://… ({expected}) or an ADO.NET connection string"
    )]
    Malformed {
        /// The schemes there are.
        expected: String,
    },
    /// The driver refused the URL or could not reach its database.
    #[error("cannot start the {driver} backplane: {source}")]
    Connect {
        /// The driver, as messages call it.
        driver: &'static str,
        /// What it said.
        source: backplane_core::Error,
    },
    /// The driver's conformance factory refused what the command was given.
    #[error("{reason}")]
    TestDatabase {
        /// Why.
        reason: String,
    },
    /// The driver refused the URL, or has no DDL, or checked nothing.
    #[error("{source}")]
    Driver {
        /// What it said.
        #[from]
        source: backplane_core::Error,
    },
}

/// The driver `url` is for, built in or not.
///
/// # Errors
///
/// A URL that no driver takes.
pub fn driver_for(url: &str) -> Result<&'static KnownDriver, DriverError> {
    if let Some(listed) = DRIVERS.iter().find(|d| d.accepts(url)) {
        return Ok(listed);
    }
    let expected = DRIVERS
        .iter()
        .map(|d| format!("{}://", d.schemes[0]))
        .collect::<Vec<_>>()
        .join(", ");
    Err(match url_scheme(url) {
        Some(scheme) => DriverError::UnknownScheme {
            scheme: scheme.to_owned(),
            expected,
        },
        None => DriverError::Malformed { expected },
    })
}

/// Opens the backplane `url` names with the driver it selects.
///
/// # Errors
///
/// A URL for no driver or for one not built in, or the driver's own error.
pub async fn connect(url: &str) -> Result<SharedBackplane, DriverError> {
    let listed = driver_for(url)?;
    let built = listed.require()?;
    (built.connect)(url)
        .await
        .map_err(|source| DriverError::Connect {
            driver: listed.title,
            source,
        })
}

/// The DDL a DBA runs for the backplane `url` names, serving `hubs`.
///
/// # Errors
///
/// As [`connect`], or a driver without a schema.
pub fn ddl(url: &str, hubs: &[HubName]) -> Result<String, DriverError> {
    let built = driver_for(url)?.require()?;
    Ok((built.ddl)(url, hubs)?)
}

/// Checks that the database `url` names has what its driver needs.
///
/// # Errors
///
/// As [`connect`]; problems found are failed [`Check`]s, not errors.
pub async fn doctor(url: &str) -> Result<Vec<Check>, DriverError> {
    let built = driver_for(url)?.require()?;
    Ok((built.doctor)(url).await?)
}

/// The conformance factory of the driver `target`'s URL selects, for a command-line run of the
/// suite.
///
/// # Errors
///
/// As [`connect`], or the factory refused the target (restart commands for a driver that
/// cannot use them).
#[cfg(feature = "conformance")]
pub fn factory(
    target: &backplane_conformance::TestDatabase<'_>,
) -> Result<Arc<dyn backplane_conformance::Factory>, DriverError> {
    let listed = driver_for(target.url)?;
    listed.require()?;
    let make = listed.factory.ok_or(DriverError::NotBuiltIn {
        driver: listed.title,
        feature: listed.name,
    })?;
    make(target).map_err(|reason| DriverError::TestDatabase { reason })
}

/// One sentence per driver for a `--backplane` help text: the URL forms built in, then the
/// cargo features of those left out.
pub fn help() -> String {
    let forms: Vec<&str> = DRIVERS.iter().filter_map(KnownDriver::url_forms).collect();
    let missing: Vec<&str> = DRIVERS
        .iter()
        .filter(|d| !d.built_in())
        .map(KnownDriver::name)
        .collect();
    let mut help = format!("Built in: {}.", forms.join("; "));
    if !missing.is_empty() {
        help.push_str(&format!(
            " Not built in (cargo features): {}.",
            missing.join(", ")
        ));
    }
    help
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_built_in_driver_is_listed_with_its_own_name_and_schemes() {
        for listed in DRIVERS {
            if let Some(built) = listed.built {
                assert_eq!(built.name, listed.name);
                assert_eq!(built.schemes, listed.schemes);
            }
        }
    }

    #[test]
    fn urls_pick_their_driver() {
        for (url, driver) in [
            ("memory://", "memory"),
            ("MEMORY://", "memory"),
            ("postgres://u@h/db", "postgres"),
            ("postgresql://u@h/db", "postgres"),
            ("mssql://sa@h/db", "mssql"),
            ("sqlserver://sa@h/db", "mssql"),
            ("Server=db,1433;User Id=sa;Password=a://b", "mssql"),
        ] {
            assert_eq!(
                driver_for(url).map(KnownDriver::name).ok(),
                Some(driver),
                "{url}"
            );
        }
    }

    #[test]
    fn a_url_for_no_driver_names_what_there_is_and_never_the_url() {
        let unknown = driver_for("nope://user:hunter2@h").map(KnownDriver::name);
        let message = unknown.expect_err("no driver").to_string();
        assert!(
            message.contains("unknown backplane scheme 'nope'"),
            "{message}"
        );
        assert!(message.contains("postgres://"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        let malformed = driver_for("hunter2").map(KnownDriver::name);
        let message = malformed.expect_err("no driver").to_string();
        assert!(message.contains("malformed backplane URL"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[tokio::test]
    async fn a_driver_left_out_names_its_feature() {
        for listed in DRIVERS.iter().filter(|d| !d.built_in()) {
            let url = format!("{}://h/db", listed.schemes[0]);
            let Err(err) = connect(&url).await else {
                panic!("{url} connected without its driver");
            };
            let message = err.to_string();
            assert!(
                message.contains(&format!("cargo feature `{}`", listed.name)),
                "{message}"
            );
        }
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn memory_connects_and_has_no_ddl() {
        let backplane = connect("memory://").await.expect("the memory driver");
        assert_eq!(backplane.driver_name(), "memory");
        let hub = HubName::new("chat").expect("a name");
        let ddl = ddl("memory://", &[hub]).expect_err("no schema").to_string();
        assert!(ddl.contains("no schema"), "{ddl}");
        let checks = doctor("memory://").await.expect("checked");
        assert!(checks.iter().all(|c| c.outcome.is_ok()), "{checks:?}");
        assert!(help().contains("memory://"));
    }
}
