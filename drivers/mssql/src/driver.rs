//! The driver as `backplane-drivers` opens it: from a URL alone.

use async_trait::async_trait;
use backplane_core::{Check, Driver, HubName, Result, ddl_for_hubs};

use crate::{MssqlBackplane, MssqlOptions};

#[async_trait]
impl Driver for MssqlBackplane {
    const NAME: &'static str = "mssql";
    const URL_SCHEMES: &'static [&'static str] = &["mssql", "sqlserver"];
    const URL_FORMS: &'static str = "`mssql://user:pass@host:1433/db?schema=backplane` (also `sqlserver://`), or an ADO.NET connection string (`Server=host,1433;Database=db;User Id=…;Password=…`)";

    /// An ADO.NET connection string (`Server=…;…`).
    fn is_connection_string(url: &str) -> bool {
        MssqlOptions::is_connection_string(url)
    }

    async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(url).await
    }

    /// The shared DDL and, with tables per hub, that of each of `hubs`.
    fn ddl_url(url: &str, hubs: &[HubName]) -> Result<String> {
        let options: MssqlOptions = url.parse()?;
        ddl_for_hubs(
            Self::ddl(&options),
            options.get_tables_per_hub(),
            hubs,
            |hub| Self::hub_ddl(&options, hub),
        )
    }

    async fn doctor_url(url: &str) -> Result<Vec<Check>> {
        let options: MssqlOptions = url.parse()?;
        Ok(crate::doctor(&options).await)
    }
}
