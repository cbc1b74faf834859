//! The driver as `backplane-drivers` opens it: from a URL alone.

use async_trait::async_trait;
use backplane_core::{Check, Driver, HubName, Result, ddl_for_hubs};

use crate::{PgBackplane, PgOptions};

#[async_trait]
impl Driver for PgBackplane {
    const NAME: &'static str = "postgres";
    const URL_SCHEMES: &'static [&'static str] = &["postgres", "postgresql"];
    const URL_FORMS: &'static str =
        "`postgres://user:pass@host:5432/db?schema=backplane` (also `postgresql://`)";

    async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(url).await
    }

    /// The shared DDL and, with tables per hub, that of each of `hubs`.
    fn ddl_url(url: &str, hubs: &[HubName]) -> Result<String> {
        let options: PgOptions = url.parse()?;
        ddl_for_hubs(
            Self::ddl(&options),
            options.get_tables_per_hub(),
            hubs,
            |hub| Self::hub_ddl(&options, hub),
        )
    }

    async fn doctor_url(url: &str) -> Result<Vec<Check>> {
        let options: PgOptions = url.parse()?;
        Ok(crate::doctor(&options).await)
    }
}
