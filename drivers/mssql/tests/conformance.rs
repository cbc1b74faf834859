//! The whole conformance suite against SQL Server, in both table layouts, when
//! `BACKPLANE_TEST_MSSQL_URL` names one (an ADO.NET connection string or an `mssql://` URL).
//! No SQL Server can be started by the tests: without the variable, the build script leaves
//! `cfg(mssql_server)` unset and every case is ignored with that reason, never passed. The
//! suite cannot stop a SQL Server it did not start, so the two cases that restart their
//! database are always skipped.

mod shared_tables {
    backplane_conformance::suite!(
        std::sync::Arc::new(backplane_mssql::testing::MssqlFactory::from_env()),
        skip: [
            database_restart_no_loss = "the tests cannot stop a SQL Server they did not start",
            failing_backplane_reports_errors = "the tests cannot stop a SQL Server they did not start",
        ],
        needs: mssql_server = "BACKPLANE_TEST_MSSQL_URL is not set: no SQL Server to test against (this machine cannot run one)",
    );
}

mod tables_per_hub {
    backplane_conformance::suite!(
        std::sync::Arc::new(backplane_mssql::testing::MssqlFactory::from_env().tables_per_hub()),
        skip: [
            database_restart_no_loss = "the tests cannot stop a SQL Server they did not start",
            failing_backplane_reports_errors = "the tests cannot stop a SQL Server they did not start",
        ],
        needs: mssql_server = "BACKPLANE_TEST_MSSQL_URL is not set: no SQL Server to test against (this machine cannot run one)",
    );
}
