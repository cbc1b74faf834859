//! Positions in the log.

use std::fmt;

/// A position in one stream of a hub's log: the offset of the next entry to read.
///
/// Offsets grow by one per entry, without gaps, in commit order. The `epoch` identifies one
/// unbroken history of the stream: when a stream loses history in any other way than retention
/// trimming (its storage was recreated, for example), its epoch changes, and a reader holding a
/// position from the old epoch gets [`Error::PositionTooOld`](crate::Error::PositionTooOld)
/// instead of silently skipping entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// The stream index, below the hub's stream count.
    pub stream: u32,
    /// The offset of the next entry.
    pub offset: u64,
    /// The history this offset belongs to.
    pub epoch: u64,
}

impl Position {
    /// A position in `stream` at `offset` of `epoch`.
    pub fn new(stream: u32, offset: u64, epoch: u64) -> Self {
        Self {
            stream,
            offset,
            epoch,
        }
    }

    /// A fresh random epoch for a stream that starts a new history. It fits in 63 bits, so it
    /// is positive in every database's signed 64-bit integer.
    pub fn random_epoch() -> u64 {
        let bytes = uuid::Uuid::new_v4().into_bytes();
        let mut low = [0u8; 8];
        low.copy_from_slice(&bytes[..8]);
        u64::from_le_bytes(low) >> 1
    }

    /// The same stream and epoch at another offset.
    pub fn at(self, offset: u64) -> Self {
        Self { offset, ..self }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}@{}", self.stream, self.offset, self.epoch)
    }
}
