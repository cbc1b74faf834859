//! The suite's factory for the in-memory driver.

use async_trait::async_trait;
use backplane_core::{Driver as _, HubName, MemoryBackplane, Position, SharedBackplane};
use bytes::Bytes;
use std::sync::Arc;

use crate::harness::{CaseError, Factory, HeldAppend, Namespace, Spec, TestDatabase};

/// Runs the suite against [`MemoryBackplane`]: each namespace is a new, empty backplane.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryFactory;

impl MemoryFactory {
    /// The factory for a command-line run against `memory://`.
    ///
    /// # Errors
    ///
    /// Restart commands were given: the memory driver restarts itself.
    pub fn for_target(target: &TestDatabase<'_>) -> Result<Arc<dyn Factory>, String> {
        target.without_restart(MemoryBackplane::NAME)?;
        Ok(Arc::new(Self))
    }
}

#[async_trait]
impl Factory for MemoryFactory {
    fn driver_name(&self) -> &'static str {
        MemoryBackplane::NAME
    }

    async fn namespace(&self, spec: &Spec) -> Result<Box<dyn Namespace>, String> {
        Ok(Box::new(MemoryNamespace {
            backplane: MemoryBackplane::new().streams(spec.streams),
        }))
    }
}

struct MemoryNamespace {
    backplane: MemoryBackplane,
}

struct MemoryHeld {
    backplane: MemoryBackplane,
    hub: HubName,
    stream: u32,
    records: Vec<Bytes>,
}

#[async_trait]
impl HeldAppend for MemoryHeld {
    async fn commit(self: Box<Self>) -> backplane_core::Result<Position> {
        use backplane_core::Backplane;
        self.backplane
            .append(&self.hub, self.stream, &self.records)
            .await
    }
}

#[async_trait]
impl Namespace for MemoryNamespace {
    async fn backplane(&self) -> Result<SharedBackplane, String> {
        Ok(Arc::new(self.backplane.clone()))
    }

    async fn interrupt_wakeups(&self) -> Result<(), CaseError> {
        self.backplane.interrupt_wakeups();
        Ok(())
    }

    async fn stop_database(&self) -> Result<(), CaseError> {
        self.backplane.set_available(false);
        Ok(())
    }

    async fn start_database(&self) -> Result<(), CaseError> {
        self.backplane.set_available(true);
        Ok(())
    }

    async fn rewind_log(&self, hub: &HubName, stream: u32, count: u64) -> Result<(), CaseError> {
        self.backplane.rewind(hub, stream, count);
        Ok(())
    }

    /// The memory driver assigns offsets when an append commits, so a held append is one that
    /// has not been applied yet.
    async fn hold_append(
        &self,
        hub: &HubName,
        stream: u32,
        records: Vec<Bytes>,
    ) -> Result<Box<dyn HeldAppend>, CaseError> {
        Ok(Box::new(MemoryHeld {
            backplane: self.backplane.clone(),
            hub: hub.clone(),
            stream,
            records,
        }))
    }
}
