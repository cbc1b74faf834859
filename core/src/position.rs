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
