//! The whole conformance suite against PostgreSQL with a table set per hub
//! (`tables_per_hub`): `BACKPLANE_TEST_PG_URL` when set, otherwise a throwaway cluster started
//! by the test process. Every namespace is a schema of its own, named apart from the default
//! layout's.

backplane_conformance::suite!(std::sync::Arc::new(
    backplane_postgres::testing::PgFactory::from_env().tables_per_hub()
));
