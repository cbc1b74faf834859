//! The driver as `backplane-drivers` opens it: from a URL alone.

use async_trait::async_trait;
use backplane_core::{Check, Driver, HubName, Result, url_scheme};

use crate::{MssqlBackplane, MssqlOptions};

#[async_trait]
impl Driver for MssqlBackplane {
    const NAME: &'static str = "mssql";
    const URL_SCHEMES: &'static [&'static str] = &["mssql", "sqlserver"];
    const URL_FORMS: &'static str = "`mssql://user:pass@host:1433/db?schema=backplane` (also `sqlserver://`), or an ADO.NET connection string (`Server=host,1433;Database=db;User Id=…;Password=…`)";

    /// Its schemes, or an ADO.NET connection string (`Server=…;…`).
    fn accepts(url: &str) -> bool {
        MssqlOptions::is_connection_string(url)
            || url_scheme(url).is_some_and(|scheme| {
                Self::URL_SCHEMES
                    .iter()
                    .any(|known| known.eq_ignore_ascii_case(scheme))
            })
    }

    async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(url).await
    }

    /// The shared DDL and, with tables per hub, that of each of `hubs`.
    fn ddl_url(url: &str, hubs: &[HubName]) -> Result<String> {
        let options: MssqlOptions = url.parse()?;
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
        let options: MssqlOptions = url.parse()?;
        Ok(crate::doctor(&options).await)
    }
}
