//! The whole conformance suite against PostgreSQL: `BACKPLANE_TEST_PG_URL` when set, otherwise a
//! throwaway cluster started by the test process. Without a server, every case fails: the
//! PostgreSQL tests never skip.

backplane_conformance::suite!(std::sync::Arc::new(
    backplane_postgres::testing::PgFactory::from_env()
));
