//! The driver as `backplane-drivers` opens it: from a URL alone.

use async_trait::async_trait;
use backplane_core::{Check, Driver, HubName, Result};

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
        let mut sql = Self::ddl(&options);
        if options.get_tables_per_hub() {
            for hub in hubs {
                sql.push('\n');
                sql.push_str(&Self::hub_ddl(&options, hub)?);
            }
        }
        Ok(sql)
    }

    async fn doctor_url(url: &str) -> Result<Vec<Check>> {
        let options: PgOptions = url.parse()?;
        Ok(crate::doctor(&options).await)
    }
}
