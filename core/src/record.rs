//! The binary encoding of log records. Drivers store these bytes without looking inside.
//!
//! Layout: a version byte, when the record was encoded (version 2: a `u64` of milliseconds
//! since the Unix epoch, by the writer's clock), a tag byte, then the record's fields. Integers are little-endian;
//! strings and byte strings carry a `u32` length; lists carry a `u32` count. Names are validated
//! again when decoded, so a corrupted or forged record can never smuggle in an invalid name.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};
use crate::message::{InvocationId, MessageId, Target};
use crate::name::{ConnectionId, GroupName, NodeId, UserId};

const VERSION: u8 = 2;

/// Records without the encoding time, still read.
const VERSION_1: u8 = 1;

const TAG_MESSAGE: u8 = 1;
const TAG_GROUPS_CHANGED: u8 = 2;
const TAG_INVOKE: u8 = 3;
const TAG_COMPLETION: u8 = 4;
const TAG_GROUP_CHANGED: u8 = 5;

const TARGET_ALL: u8 = 0;
const TARGET_GROUPS: u8 = 1;
const TARGET_USERS: u8 = 2;
const TARGET_CONNECTIONS: u8 = 3;

/// One entry of the log, as the node reads and writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    /// A message to deliver.
    Message(Envelope),
    /// A connection's group memberships changed in the shared state; the node that holds the
    /// connection reloads them. Written by earlier versions, still read.
    GroupsChanged {
        change: u64,
        connection: ConnectionId,
    },
    /// A connection was added to or removed from `group` in the shared state; the node that
    /// holds the connection reloads its groups, or applies this change when the shared state
    /// does not know the connection (its node was reaped and has not registered it again).
    GroupChanged {
        change: u64,
        connection: ConnectionId,
        group: GroupName,
        member: bool,
    },
    /// A client-result invocation for a connection held by `node`.
    Invoke {
        id: InvocationId,
        caller: NodeId,
        node: NodeId,
        connection: ConnectionId,
        payload: Bytes,
    },
    /// The outcome of an invocation, for the caller's node.
    Completion {
        id: InvocationId,
        caller: NodeId,
        outcome: Outcome,
    },
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Result(Bytes),
    ClientError(String),
    Disconnected(ConnectionId),
}

/// A message as it travels through the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Envelope {
    pub(crate) origin: NodeId,
    pub(crate) target: Target,
    pub(crate) except: Vec<ConnectionId>,
    /// The stored copy of a durable message, and when it stops being deliverable (milliseconds
    /// since the Unix epoch, by the publishing node's clock).
    pub(crate) durable: Option<(MessageId, u64)>,
    pub(crate) payload: Bytes,
}

impl Record {
    pub(crate) fn encode(&self) -> Bytes {
        let mut w = Writer(BytesMut::with_capacity(64 + self.payload_len()));
        w.0.put_u8(VERSION);
        w.0.put_u64_le(unix_ms(std::time::SystemTime::now()));
        match self {
            Self::Message(env) => {
                w.0.put_u8(TAG_MESSAGE);
                w.str(env.origin.as_str());
                match &env.target {
                    Target::All => w.0.put_u8(TARGET_ALL),
                    Target::Groups(v) => w.list(TARGET_GROUPS, v),
                    Target::Users(v) => w.list(TARGET_USERS, v),
                    Target::Connections(v) => w.list(TARGET_CONNECTIONS, v),
                }
                w.list(0, &env.except);
                match env.durable {
                    Some((id, expires)) => {
                        w.0.put_u8(1);
                        w.0.put_u64_le(id.0);
                        w.0.put_u64_le(expires);
                    }
                    None => w.0.put_u8(0),
                }
                w.bytes(&env.payload);
            }
            Self::GroupsChanged { change, connection } => {
                w.0.put_u8(TAG_GROUPS_CHANGED);
                w.0.put_u64_le(*change);
                w.str(connection.as_str());
            }
            Self::GroupChanged {
                change,
                connection,
                group,
                member,
            } => {
                w.0.put_u8(TAG_GROUP_CHANGED);
                w.0.put_u64_le(*change);
                w.str(connection.as_str());
                w.str(group.as_str());
                w.0.put_u8(u8::from(*member));
            }
            Self::Invoke {
                id,
                caller,
                node,
                connection,
                payload,
            } => {
                w.0.put_u8(TAG_INVOKE);
                w.str(id.as_str());
                w.str(caller.as_str());
                w.str(node.as_str());
                w.str(connection.as_str());
                w.bytes(payload);
            }
            Self::Completion {
                id,
                caller,
                outcome,
            } => {
                w.0.put_u8(TAG_COMPLETION);
                w.str(id.as_str());
                w.str(caller.as_str());
                match outcome {
                    Outcome::Result(b) => {
                        w.0.put_u8(0);
                        w.bytes(b);
                    }
                    Outcome::ClientError(e) => {
                        w.0.put_u8(1);
                        w.str(e);
                    }
                    Outcome::Disconnected(c) => {
                        w.0.put_u8(2);
                        w.str(c.as_str());
                    }
                }
            }
        }
        w.0.freeze()
    }

    fn payload_len(&self) -> usize {
        match self {
            Self::Message(env) => env.payload.len(),
            Self::Invoke { payload, .. } => payload.len(),
            Self::Completion {
                outcome: Outcome::Result(b),
                ..
            } => b.len(),
            _ => 0,
        }
    }

    /// When the record was encoded (milliseconds since the Unix epoch, by the writer's clock),
    /// if it says.
    pub(crate) fn encoded_at(data: &[u8]) -> Option<u64> {
        match data {
            [VERSION, a, b, c, d, e, f, g, h, ..] => {
                Some(u64::from_le_bytes([*a, *b, *c, *d, *e, *f, *g, *h]))
            }
            _ => None,
        }
    }

    pub(crate) fn decode(data: &Bytes) -> Result<Self> {
        let mut r = Reader { data, at: 0 };
        match r.u8()? {
            VERSION => {
                r.u64()?;
            }
            VERSION_1 => {}
            version => {
                return Err(Error::Corrupt(format!("unknown record version {version}")));
            }
        }
        let record = match r.u8()? {
            TAG_MESSAGE => {
                let origin = NodeId::new(r.str()?)?;
                let target = match r.u8()? {
                    TARGET_ALL => Target::All,
                    TARGET_GROUPS => Target::Groups(r.names(|s| GroupName::new(s))?),
                    TARGET_USERS => Target::Users(r.names(|s| UserId::new(s))?),
                    TARGET_CONNECTIONS => Target::Connections(r.names(|s| ConnectionId::new(s))?),
                    other => return Err(Error::Corrupt(format!("unknown target kind {other}"))),
                };
                let except = r.names(|s| ConnectionId::new(s))?;
                let durable = match r.u8()? {
                    0 => None,
                    _ => Some((MessageId(r.u64()?), r.u64()?)),
                };
                let payload = r.bytes()?;
                Self::Message(Envelope {
                    origin,
                    target,
                    except,
                    durable,
                    payload,
                })
            }
            TAG_GROUPS_CHANGED => Self::GroupsChanged {
                change: r.u64()?,
                connection: ConnectionId::new(r.str()?)?,
            },
            TAG_GROUP_CHANGED => Self::GroupChanged {
                change: r.u64()?,
                connection: ConnectionId::new(r.str()?)?,
                group: GroupName::new(r.str()?)?,
                member: match r.u8()? {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(Error::Corrupt(format!("invalid membership flag {other}")));
                    }
                },
            },
            TAG_INVOKE => Self::Invoke {
                id: InvocationId::new(r.str()?),
                caller: NodeId::new(r.str()?)?,
                node: NodeId::new(r.str()?)?,
                connection: ConnectionId::new(r.str()?)?,
                payload: r.bytes()?,
            },
            TAG_COMPLETION => Self::Completion {
                id: InvocationId::new(r.str()?),
                caller: NodeId::new(r.str()?)?,
                outcome: match r.u8()? {
                    0 => Outcome::Result(r.bytes()?),
                    1 => Outcome::ClientError(r.str()?.to_owned()),
                    _ => Outcome::Disconnected(ConnectionId::new(r.str()?)?),
                },
            },
            other => return Err(Error::Corrupt(format!("unknown record tag {other}"))),
        };
        if r.at != data.len() {
            return Err(Error::Corrupt(format!(
                "{} trailing bytes after the record",
                data.len() - r.at
            )));
        }
        Ok(record)
    }
}

struct Writer(BytesMut);

impl Writer {
    fn len(&mut self, n: usize) {
        // Payloads and names are bounded far below 4 GiB by validation before encoding.
        self.0.put_u32_le(u32::try_from(n).unwrap_or(u32::MAX));
    }

    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.0.put_slice(b);
    }

    fn list<T: AsRef<str>>(&mut self, kind: u8, items: &[T]) {
        if kind != 0 {
            self.0.put_u8(kind);
        }
        self.len(items.len());
        for item in items {
            self.str(item.as_ref());
        }
    }
}

struct Reader<'a> {
    data: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.data.len())
            .ok_or_else(|| Error::Corrupt("record is truncated".to_owned()))?;
        let slice = &self.data[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<usize> {
        let b = self.take(4)?;
        let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        usize::try_from(n).map_err(|_| Error::Corrupt("length does not fit".to_owned()))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn str(&mut self) -> Result<&'a str> {
        let n = self.u32()?;
        std::str::from_utf8(self.take(n)?)
            .map_err(|_| Error::Corrupt("a name is not valid UTF-8".to_owned()))
    }

    fn bytes(&mut self) -> Result<Bytes> {
        let n = self.u32()?;
        let start = self.at;
        self.take(n)?;
        Ok(self.data.slice(start..start + n))
    }

    fn names<T>(&mut self, parse: fn(&str) -> Result<T>) -> Result<Vec<T>> {
        let n = self.u32()?;
        // Every name takes at least five bytes; a count beyond that is corrupt, not a reason to
        // reserve gigabytes.
        if n > (self.data.len() - self.at) / 5 {
            return Err(Error::Corrupt("list count exceeds the record".to_owned()));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(parse(self.str()?)?);
        }
        Ok(out)
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn unix_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(record: Record) {
        let bytes = record.encode();
        assert_eq!(Record::decode(&bytes).unwrap(), record);
        // Every truncation is an error, never a panic.
        for cut in 0..bytes.len() {
            assert!(Record::decode(&bytes.slice(..cut)).is_err());
        }
    }

    #[test]
    fn records_roundtrip() {
        let node = NodeId::new("n1").unwrap();
        let conn = ConnectionId::new("c1").unwrap();
        roundtrip(Record::Message(Envelope {
            origin: node.clone(),
            target: Target::Groups(vec![GroupName::new("g ' *").unwrap()]),
            except: vec![conn.clone()],
            durable: Some((MessageId(7), 1_700_000_000_000)),
            payload: Bytes::from((0..=255u8).collect::<Vec<_>>()),
        }));
        roundtrip(Record::Message(Envelope {
            origin: node.clone(),
            target: Target::All,
            except: vec![],
            durable: None,
            payload: Bytes::new(),
        }));
        roundtrip(Record::GroupsChanged {
            change: 42,
            connection: conn.clone(),
        });
        for member in [true, false] {
            roundtrip(Record::GroupChanged {
                change: 43,
                connection: conn.clone(),
                group: GroupName::new("room").expect("valid"),
                member,
            });
        }
        roundtrip(Record::Invoke {
            id: InvocationId::new("n1.1"),
            caller: node.clone(),
            node: node.clone(),
            connection: conn.clone(),
            payload: Bytes::from_static(b"[1]"),
        });
        for outcome in [
            Outcome::Result(Bytes::from_static(b"3")),
            Outcome::ClientError("boom".into()),
            Outcome::Disconnected(conn.clone()),
        ] {
            roundtrip(Record::Completion {
                id: InvocationId::new("n1.2"),
                caller: node.clone(),
                outcome,
            });
        }
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(Record::decode(&Bytes::from_static(b"")).is_err());
        assert!(Record::decode(&Bytes::from_static(&[9, 1])).is_err());
        assert!(Record::decode(&Bytes::from_static(&[1, 99])).is_err());
        let huge_count = [1u8, 1, 2, 0, 0, 0, b'n', 1, 0xff, 0xff, 0xff, 0xff];
        assert!(Record::decode(&Bytes::copy_from_slice(&huge_count)).is_err());
    }

    #[test]
    fn records_say_when_they_were_encoded_and_old_ones_still_read() {
        let before = unix_ms(std::time::SystemTime::now());
        let record = Record::GroupsChanged {
            change: 1,
            connection: ConnectionId::new("c").unwrap(),
        };
        let bytes = record.encode();
        let at = Record::encoded_at(&bytes).expect("a time");
        assert!(at >= before && at <= before + 60_000, "{at} vs {before}");
        // Version 1: no time, same fields.
        let mut old = vec![VERSION_1];
        old.extend_from_slice(&bytes[9..]);
        assert_eq!(Record::encoded_at(&old), None);
        assert_eq!(Record::decode(&Bytes::from(old)).unwrap(), record);
    }
}
