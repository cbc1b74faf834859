//! The whole conformance suite against the in-memory driver.

backplane_conformance::suite!(std::sync::Arc::new(backplane_conformance::MemoryFactory));
