//! The SignalR hub protocols: the handshake, the hub messages, and their two encodings, JSON
//! (records ending in `0x1E`) and MessagePack (length-prefixed arrays, in [`Protocol`]).
//!
//! Follows the published HubProtocol specification (message types 1 to 9, including `Ack` and
//! `Sequence` of protocol version 2 for stateful reconnect).

mod msgpack;

use serde_json::{Map, Value};

/// A hub protocol: how hub messages are encoded after the (always JSON) handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `json`: UTF-8 JSON records, each followed by `0x1E`, in text frames.
    Json,
    /// `messagepack`: MessagePack arrays, each preceded by its length, in binary frames.
    MessagePack,
}

impl Protocol {
    /// The name the handshake uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::MessagePack => "messagepack",
        }
    }

    /// The protocol a handshake names, if it is one spoken here.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "json" => Some(Self::Json),
            "messagepack" => Some(Self::MessagePack),
            _ => None,
        }
    }

    /// Whether messages travel in binary frames.
    pub fn is_binary(self) -> bool {
        matches!(self, Self::MessagePack)
    }

    /// The framed bytes of `message`: a JSON record with its separator, or a length-prefixed
    /// MessagePack array.
    pub fn encode(self, message: &HubMessage) -> Vec<u8> {
        match self {
            Self::Json => message.encode(),
            Self::MessagePack => msgpack::encode(message),
        }
    }

    /// Parses one record, as split by a [`RecordBuffer`] of this protocol.
    ///
    /// # Errors
    ///
    /// Malformed input, an unknown message type, fields of the wrong type, or (MessagePack)
    /// a value with no JSON form.
    pub fn parse(self, record: &[u8]) -> Result<HubMessage, ProtocolError> {
        match self {
            Self::Json => HubMessage::parse(record),
            Self::MessagePack => msgpack::parse(record),
        }
    }

    /// Re-encodes a JSON record (without its separator) in this protocol; JSON stays as it is.
    ///
    /// # Errors
    ///
    /// The record is not a valid JSON hub message.
    pub fn transcode<'a>(
        self,
        json_record: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>, ProtocolError> {
        match self {
            Self::Json => Ok(std::borrow::Cow::Borrowed(json_record)),
            Self::MessagePack => {
                let record = json_record
                    .strip_suffix(&[RECORD_SEPARATOR])
                    .unwrap_or(json_record);
                Ok(std::borrow::Cow::Owned(msgpack::encode(
                    &HubMessage::parse(record)?,
                )))
            }
        }
    }
}

/// Ends every JSON record.
pub const RECORD_SEPARATOR: u8 = 0x1e;

/// The highest hub protocol version spoken here: 2 adds `Ack` and `Sequence` for
/// stateful reconnect.
pub const MAX_VERSION: u32 = 2;

/// Why bytes from the peer are not a valid hub protocol record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

fn bad(reason: impl Into<String>) -> ProtocolError {
    ProtocolError(reason.into())
}

/// The client's first record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The protocol name; only `json` is spoken here.
    pub protocol: String,
    /// The protocol version the client asks for.
    pub version: u32,
}

impl Handshake {
    /// Parses a handshake record (without its separator).
    ///
    /// # Errors
    ///
    /// Malformed JSON or missing fields.
    pub fn parse(record: &[u8]) -> Result<Self, ProtocolError> {
        let value: Value = serde_json::from_slice(record)
            .map_err(|e| bad(format!("the handshake is not valid JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| bad("the handshake must be a JSON object"))?;
        let protocol = object
            .get("protocol")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("the handshake has no 'protocol' string"))?
            .to_owned();
        let version = object
            .get("version")
            .and_then(Value::as_i64)
            .ok_or_else(|| bad("the handshake has no 'version' number"))?;
        // A 32-bit integer, as ASP.NET Core reads it; a negative version asks for less than
        // version 0 and gets version 0.
        let version = i32::try_from(version)
            .map_err(|_| bad("the handshake version is out of range"))?
            .max(0)
            .unsigned_abs();
        Ok(Self { protocol, version })
    }

    /// The handshake record a client sends, with its separator.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(&serde_json::json!({
            "protocol": self.protocol,
            "version": self.version,
        }))
        .unwrap_or_default();
        out.push(RECORD_SEPARATOR);
        out
    }
}

/// The server's answer to a handshake, as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeResponse {
    /// Why the server refused the handshake; `None` when it accepted it.
    pub error: Option<String>,
}

impl HandshakeResponse {
    /// Parses the server's handshake record (without its separator): `{}` or `{"error": …}`.
    ///
    /// # Errors
    ///
    /// A record that is not a JSON object, or an `error` that is not a string.
    pub fn parse(record: &[u8]) -> Result<Self, ProtocolError> {
        let value: Value = serde_json::from_slice(record)
            .map_err(|e| bad(format!("the handshake response is not valid JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| bad("the handshake response must be a JSON object"))?;
        Ok(Self {
            error: optional_string(object.get("error"), "error")?,
        })
    }
}

/// The server's answer to a handshake: `{}` or `{"error": …}`, with its separator.
pub fn handshake_response(error: Option<&str>) -> Vec<u8> {
    let mut out = match error {
        None => b"{}".to_vec(),
        Some(error) => serde_json::to_vec(&serde_json::json!({ "error": error }))
            .unwrap_or_else(|_| b"{\"error\":\"handshake failed\"}".to_vec()),
    };
    out.push(RECORD_SEPARATOR);
    out
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Finished without a value.
    Void,
    /// Finished with a value.
    Result(Value),
    /// Failed with an error message.
    Error(String),
}

/// One hub protocol message.
#[derive(Debug, Clone, PartialEq)]
pub enum HubMessage {
    /// Type 1: call a method, with an id when the caller wants a completion.
    Invocation {
        /// The id the completion answers, if one is wanted.
        invocation_id: Option<String>,
        /// The method name.
        target: String,
        /// The arguments.
        arguments: Vec<Value>,
        /// Ids of client-to-server streams passed as arguments.
        stream_ids: Vec<String>,
    },
    /// Type 2: one item of a stream.
    StreamItem {
        /// The stream's invocation id.
        invocation_id: String,
        /// The item.
        item: Value,
    },
    /// Type 3: the end of an invocation.
    Completion {
        /// The invocation it ends.
        invocation_id: String,
        /// Its result or error.
        outcome: Outcome,
    },
    /// Type 4: call a streaming method.
    StreamInvocation {
        /// The id its items and completion carry.
        invocation_id: String,
        /// The method name.
        target: String,
        /// The arguments.
        arguments: Vec<Value>,
        /// Ids of client-to-server streams passed as arguments.
        stream_ids: Vec<String>,
    },
    /// Type 5: stop a stream.
    CancelInvocation {
        /// The stream's invocation id.
        invocation_id: String,
    },
    /// Type 6: keep-alive.
    Ping,
    /// Type 7: the connection is closing.
    Close {
        /// Why, if it was an error.
        error: Option<String>,
        /// Whether the client may reconnect.
        allow_reconnect: bool,
    },
    /// Type 8: every message up to this sequence id arrived (protocol version 2).
    Ack {
        /// The last sequence id received.
        sequence_id: u64,
    },
    /// Type 9: the next message carries this sequence id (protocol version 2).
    Sequence {
        /// The sequence id of the next message.
        sequence_id: u64,
    },
}

/// A required string field (`value` is the field, `None` when absent).
pub(crate) fn string(value: Option<&Value>, field: &str) -> Result<String, ProtocolError> {
    match value {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad(format!("'{field}' must be a string"))),
        None => Err(bad(format!("missing '{field}'"))),
    }
}

/// An optional string field: absent or null is `None`.
pub(crate) fn optional_string(
    value: Option<&Value>,
    field: &str,
) -> Result<Option<String>, ProtocolError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(format!("'{field}' must be a string"))),
    }
}

/// The required `arguments` array.
pub(crate) fn arguments(value: Option<&Value>) -> Result<Vec<Value>, ProtocolError> {
    match value {
        Some(Value::Array(items)) => Ok(items.clone()),
        Some(_) => Err(bad("'arguments' must be an array")),
        None => Err(bad("missing 'arguments'")),
    }
}

/// The optional `streamIds` array of strings.
pub(crate) fn stream_ids(value: Option<&Value>) -> Result<Vec<String>, ProtocolError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad("'streamIds' must hold strings"))
            })
            .collect(),
        Some(_) => Err(bad("'streamIds' must be an array")),
    }
}

/// A required non-negative integer field.
pub(crate) fn unsigned(value: Option<&Value>, field: &str) -> Result<u64, ProtocolError> {
    value
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(format!("'{field}' must be a non-negative integer")))
}

impl HubMessage {
    /// Parses one record (without its separator).
    ///
    /// # Errors
    ///
    /// Malformed JSON, an unknown message type, or fields of the wrong type.
    pub fn parse(record: &[u8]) -> Result<Self, ProtocolError> {
        let value: Value =
            serde_json::from_slice(record).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let Value::Object(object) = value else {
            return Err(bad("a message must be a JSON object"));
        };
        let kind = object
            .get("type")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("missing or invalid 'type'"))?;
        Ok(match kind {
            1 => Self::Invocation {
                invocation_id: optional_string(object.get("invocationId"), "invocationId")?,
                target: string(object.get("target"), "target")?,
                arguments: arguments(object.get("arguments"))?,
                stream_ids: stream_ids(object.get("streamIds"))?,
            },
            2 => Self::StreamItem {
                invocation_id: string(object.get("invocationId"), "invocationId")?,
                item: object.get("item").cloned().unwrap_or(Value::Null),
            },
            3 => {
                let invocation_id = string(object.get("invocationId"), "invocationId")?;
                let outcome = match (object.get("error"), object.get("result")) {
                    (Some(Value::String(error)), _) => Outcome::Error(error.clone()),
                    (Some(Value::Null) | None, Some(result)) => Outcome::Result(result.clone()),
                    (Some(Value::Null) | None, None) => Outcome::Void,
                    (Some(_), _) => return Err(bad("'error' must be a string")),
                };
                Self::Completion {
                    invocation_id,
                    outcome,
                }
            }
            4 => Self::StreamInvocation {
                invocation_id: string(object.get("invocationId"), "invocationId")?,
                target: string(object.get("target"), "target")?,
                arguments: arguments(object.get("arguments"))?,
                stream_ids: stream_ids(object.get("streamIds"))?,
            },
            5 => Self::CancelInvocation {
                invocation_id: string(object.get("invocationId"), "invocationId")?,
            },
            6 => Self::Ping,
            7 => Self::Close {
                error: optional_string(object.get("error"), "error")?,
                allow_reconnect: object
                    .get("allowReconnect")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            },
            8 => Self::Ack {
                sequence_id: unsigned(object.get("sequenceId"), "sequenceId")?,
            },
            9 => Self::Sequence {
                sequence_id: unsigned(object.get("sequenceId"), "sequenceId")?,
            },
            other => return Err(bad(format!("unknown message type {other}"))),
        })
    }

    /// Whether this message counts for stateful reconnect's sequence ids: everything except
    /// `Ping`, `Close`, `Ack` and `Sequence`.
    pub fn is_sequenced(&self) -> bool {
        !matches!(
            self,
            Self::Ping | Self::Close { .. } | Self::Ack { .. } | Self::Sequence { .. }
        )
    }

    /// The record for this message, with its separator.
    pub fn encode(&self) -> Vec<u8> {
        let mut object = Map::new();
        let mut put = |key: &str, value: Value| {
            object.insert(key.to_owned(), value);
        };
        match self {
            Self::Invocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
            } => {
                put("type", 1.into());
                if let Some(id) = invocation_id {
                    put("invocationId", id.clone().into());
                }
                put("target", target.clone().into());
                put("arguments", Value::Array(arguments.clone()));
                if !stream_ids.is_empty() {
                    put("streamIds", stream_ids.clone().into());
                }
            }
            Self::StreamItem {
                invocation_id,
                item,
            } => {
                put("type", 2.into());
                put("invocationId", invocation_id.clone().into());
                put("item", item.clone());
            }
            Self::Completion {
                invocation_id,
                outcome,
            } => {
                put("type", 3.into());
                put("invocationId", invocation_id.clone().into());
                match outcome {
                    Outcome::Void => {}
                    Outcome::Result(value) => put("result", value.clone()),
                    Outcome::Error(error) => put("error", error.clone().into()),
                }
            }
            Self::StreamInvocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
            } => {
                put("type", 4.into());
                put("invocationId", invocation_id.clone().into());
                put("target", target.clone().into());
                put("arguments", Value::Array(arguments.clone()));
                if !stream_ids.is_empty() {
                    put("streamIds", stream_ids.clone().into());
                }
            }
            Self::CancelInvocation { invocation_id } => {
                put("type", 5.into());
                put("invocationId", invocation_id.clone().into());
            }
            Self::Ping => put("type", 6.into()),
            Self::Close {
                error,
                allow_reconnect,
            } => {
                put("type", 7.into());
                if let Some(error) = error {
                    put("error", error.clone().into());
                }
                if *allow_reconnect {
                    put("allowReconnect", true.into());
                }
            }
            Self::Ack { sequence_id } => {
                put("type", 8.into());
                put("sequenceId", (*sequence_id).into());
            }
            Self::Sequence { sequence_id } => {
                put("type", 9.into());
                put("sequenceId", (*sequence_id).into());
            }
        }
        // A map of plain JSON values always serializes.
        let mut out = serde_json::to_vec(&Value::Object(object)).unwrap_or_default();
        out.push(RECORD_SEPARATOR);
        out
    }
}

/// An invocation of `target` with `arguments`, without an id, as a record: what a broadcast
/// sends to every recipient.
pub fn invocation(target: &str, arguments: &[Value]) -> Vec<u8> {
    /// Serialized straight from the borrowed arguments: this runs for every send.
    #[derive(serde::Serialize)]
    struct Invocation<'a> {
        #[serde(rename = "type")]
        kind: u8,
        target: &'a str,
        arguments: &'a [Value],
    }
    let mut out = serde_json::to_vec(&Invocation {
        kind: 1,
        target,
        arguments,
    })
    .unwrap_or_default();
    out.push(RECORD_SEPARATOR);
    out
}

/// Splits incoming frames into records, keeping an incomplete tail for the next frame: at
/// `0x1E` separators (JSON and the handshake) or by length prefixes (MessagePack).
#[derive(Debug, Default)]
pub struct RecordBuffer {
    pending: Vec<u8>,
    length_prefixed: bool,
}

impl RecordBuffer {
    /// A buffer for `protocol`'s records.
    pub fn new(protocol: Protocol) -> Self {
        Self {
            pending: Vec::new(),
            length_prefixed: protocol == Protocol::MessagePack,
        }
    }

    /// Continues with `protocol`'s framing after the handshake, keeping the bytes that followed
    /// it.
    pub fn switch_to(&mut self, protocol: Protocol) {
        self.length_prefixed = protocol == Protocol::MessagePack;
    }

    /// Appends `data` and returns the complete records it finishes (without separators or
    /// length prefixes).
    ///
    /// # Errors
    ///
    /// A record longer than `max` bytes, or a malformed length prefix.
    pub fn push(&mut self, data: &[u8], max: usize) -> Result<Vec<Vec<u8>>, ProtocolError> {
        self.pending.extend_from_slice(data);
        self.drain(max)
    }

    /// Appends `data` and returns the handshake record (the first, ended by `0x1E`) once it is
    /// complete. What follows it stays buffered for [`drain`](Self::drain), in the framing set
    /// by [`switch_to`](Self::switch_to).
    ///
    /// # Errors
    ///
    /// A handshake longer than `max` bytes, or bytes that cannot start a JSON object.
    pub fn push_handshake(
        &mut self,
        data: &[u8],
        max: usize,
    ) -> Result<Option<Vec<u8>>, ProtocolError> {
        self.pending.extend_from_slice(data);
        // A handshake is a JSON object: anything else (such as a MessagePack message from a
        // client resuming on the wrong node) is refused at once, not after a timeout.
        if let Some(first) = self.pending.iter().find(|b| !b.is_ascii_whitespace())
            && *first != b'{'
        {
            return Err(bad("the handshake must be a JSON object"));
        }
        match self.pending.iter().position(|b| *b == RECORD_SEPARATOR) {
            Some(end) => {
                let record = self.pending[..end].to_vec();
                self.pending.drain(..=end);
                Ok(Some(record))
            }
            None if self.pending.len() > max => Err(bad(format!(
                "the handshake exceeds the maximum size of {max} bytes"
            ))),
            None => Ok(None),
        }
    }

    /// The complete records already buffered, as [`push`](Self::push) returns them.
    ///
    /// # Errors
    ///
    /// As [`push`](Self::push).
    pub fn drain(&mut self, max: usize) -> Result<Vec<Vec<u8>>, ProtocolError> {
        let mut records = Vec::new();
        let mut start = 0;
        if self.length_prefixed {
            while let Some((len, prefix)) = msgpack::read_length(&self.pending[start..])? {
                if len > max {
                    return Err(bad(format!(
                        "a message exceeds the maximum size of {max} bytes"
                    )));
                }
                let body = start + prefix;
                if self.pending.len() < body + len {
                    break;
                }
                records.push(self.pending[body..body + len].to_vec());
                start = body + len;
            }
        } else {
            while let Some(end) = self.pending[start..]
                .iter()
                .position(|b| *b == RECORD_SEPARATOR)
            {
                records.push(self.pending[start..start + end].to_vec());
                start += end + 1;
            }
        }
        self.pending.drain(..start);
        if self.pending.len() > max {
            return Err(bad(format!(
                "a message exceeds the maximum size of {max} bytes"
            )));
        }
        Ok(records)
    }

    /// Whether part of a record is waiting for its end.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn strip(mut record: Vec<u8>) -> Vec<u8> {
        assert_eq!(record.pop(), Some(RECORD_SEPARATOR));
        record
    }

    #[test]
    fn parses_the_handshake() {
        let h = Handshake::parse(br#"{"protocol":"json","version":1}"#).unwrap();
        assert_eq!(h.protocol, "json");
        assert_eq!(h.version, 1);
        assert!(Handshake::parse(br#"{"protocol":"json"}"#).is_err());
        assert!(Handshake::parse(b"nope").is_err());
        let request = Handshake {
            protocol: "json".into(),
            version: 1,
        };
        assert_eq!(Handshake::parse(&strip(request.encode())).unwrap(), request);
        assert_eq!(
            HandshakeResponse::parse(&strip(handshake_response(None))).unwrap(),
            HandshakeResponse { error: None }
        );
        assert_eq!(
            HandshakeResponse::parse(&strip(handshake_response(Some("no"))))
                .unwrap()
                .error
                .as_deref(),
            Some("no")
        );
        assert!(HandshakeResponse::parse(b"[]").is_err());
        assert!(HandshakeResponse::parse(br#"{"error":1}"#).is_err());
        assert_eq!(handshake_response(None), b"{}\x1e");
        assert_eq!(
            handshake_response(Some("bad")),
            b"{\"error\":\"bad\"}\x1e".to_vec()
        );
    }

    #[test]
    fn round_trips_every_message_type() {
        let messages = vec![
            HubMessage::Invocation {
                invocation_id: Some("1".into()),
                target: "Send".into(),
                arguments: vec![json!("a"), json!(2)],
                stream_ids: vec![],
            },
            HubMessage::Invocation {
                invocation_id: None,
                target: "Send".into(),
                arguments: vec![],
                stream_ids: vec!["s".into()],
            },
            HubMessage::StreamItem {
                invocation_id: "1".into(),
                item: json!({"x": 1}),
            },
            HubMessage::Completion {
                invocation_id: "1".into(),
                outcome: Outcome::Result(json!(42)),
            },
            HubMessage::Completion {
                invocation_id: "1".into(),
                outcome: Outcome::Error("boom".into()),
            },
            HubMessage::Completion {
                invocation_id: "1".into(),
                outcome: Outcome::Void,
            },
            HubMessage::StreamInvocation {
                invocation_id: "2".into(),
                target: "Counter".into(),
                arguments: vec![json!(3)],
                stream_ids: vec![],
            },
            HubMessage::CancelInvocation {
                invocation_id: "2".into(),
            },
            HubMessage::Ping,
            HubMessage::Close {
                error: Some("bye".into()),
                allow_reconnect: true,
            },
            HubMessage::Close {
                error: None,
                allow_reconnect: false,
            },
            HubMessage::Ack { sequence_id: 7 },
            HubMessage::Sequence { sequence_id: 8 },
        ];
        for message in messages {
            let record = strip(message.encode());
            assert_eq!(HubMessage::parse(&record).unwrap(), message);
        }
    }

    #[test]
    fn a_null_result_is_a_result() {
        let m = HubMessage::parse(br#"{"type":3,"invocationId":"1","result":null}"#).unwrap();
        assert_eq!(
            m,
            HubMessage::Completion {
                invocation_id: "1".into(),
                outcome: Outcome::Result(Value::Null)
            }
        );
    }

    #[test]
    fn refuses_bad_records_with_a_reason() {
        for (input, reason) in [
            (&b"{"[..], "invalid JSON"),
            (b"[]", "JSON object"),
            (b"{}", "'type'"),
            (br#"{"type":"1"}"#, "'type'"),
            (br#"{"type":99}"#, "unknown message type 99"),
            (br#"{"type":1,"arguments":[]}"#, "missing 'target'"),
            (
                br#"{"type":1,"target":5,"arguments":[]}"#,
                "'target' must be",
            ),
            (
                br#"{"type":1,"target":"a","arguments":{}}"#,
                "'arguments' must",
            ),
            (br#"{"type":1,"target":"a"}"#, "missing 'arguments'"),
            (br#"{"type":3,"invocationId":"1","error":5}"#, "'error'"),
            (br#"{"type":8,"sequenceId":-1}"#, "'sequenceId'"),
        ] {
            let err = HubMessage::parse(input).unwrap_err();
            assert!(err.0.contains(reason), "{input:?}: {err}");
        }
    }

    #[test]
    fn splits_records_across_frames() {
        let mut buffer = RecordBuffer::default();
        let records = buffer.push(b"{\"type\":6}\x1e{\"ty", 100).unwrap();
        assert_eq!(records, vec![b"{\"type\":6}".to_vec()]);
        assert!(!buffer.is_empty());
        let records = buffer.push(b"pe\":6}\x1e", 100).unwrap();
        assert_eq!(records, vec![b"{\"type\":6}".to_vec()]);
        assert!(buffer.is_empty());
        assert!(buffer.push(&[b'x'; 101], 100).is_err());
    }

    #[test]
    fn a_handshake_may_share_its_frame_with_messagepack() {
        let ping = Protocol::MessagePack.encode(&HubMessage::Ping);
        let mut frame = br#"{"protocol":"messagepack","version":1}"#.to_vec();
        frame.push(RECORD_SEPARATOR);
        frame.extend_from_slice(&ping);
        // A MessagePack byte that happens to be the JSON separator must not split a record.
        let close = Protocol::MessagePack.encode(&HubMessage::Close {
            error: Some("\u{1e}".into()),
            allow_reconnect: false,
        });
        frame.extend_from_slice(&close[..3]);
        let mut buffer = RecordBuffer::default();
        let handshake = buffer.push_handshake(&frame, 1000).unwrap().unwrap();
        assert_eq!(
            Handshake::parse(&handshake).unwrap().protocol,
            "messagepack"
        );
        buffer.switch_to(Protocol::MessagePack);
        let records = buffer.drain(1000).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(
            Protocol::MessagePack.parse(&records[0]).unwrap(),
            HubMessage::Ping
        );
        let records = buffer.push(&close[3..], 1000).unwrap();
        assert!(matches!(
            Protocol::MessagePack.parse(&records[0]).unwrap(),
            HubMessage::Close { error: Some(e), .. } if e == "\u{1e}"
        ));
        assert!(buffer.is_empty());
        // Bytes that cannot begin a handshake are refused without waiting for more.
        let packed = Protocol::MessagePack.encode(&HubMessage::Sequence { sequence_id: 3 });
        assert!(
            RecordBuffer::default()
                .push_handshake(&packed, 1000)
                .is_err()
        );
        assert_eq!(
            RecordBuffer::default().push_handshake(b" {\"pro", 1000),
            Ok(None)
        );
        // A length over the limit is refused before the bytes arrive.
        let mut big = Vec::new();
        msgpack::put_length(&mut big, 5000);
        assert!(
            RecordBuffer::new(Protocol::MessagePack)
                .push(&big, 1000)
                .is_err()
        );
    }

    #[test]
    fn json_deliveries_transcode_to_messagepack() {
        let json = invocation("ReceiveMessage", &[json!("ada"), json!("hi")]);
        assert_eq!(&*Protocol::Json.transcode(&json).unwrap(), &json[..]);
        let packed = Protocol::MessagePack.transcode(&json).unwrap();
        let mut buffer = RecordBuffer::new(Protocol::MessagePack);
        let records = buffer.push(&packed, 1000).unwrap();
        assert_eq!(
            Protocol::MessagePack.parse(&records[0]).unwrap(),
            HubMessage::Invocation {
                invocation_id: None,
                target: "ReceiveMessage".into(),
                arguments: vec![json!("ada"), json!("hi")],
                stream_ids: vec![],
            }
        );
        assert_eq!(
            Protocol::from_name("messagepack"),
            Some(Protocol::MessagePack)
        );
        assert_eq!(Protocol::from_name("xml"), None);
        assert!(Protocol::MessagePack.is_binary() && !Protocol::Json.is_binary());
    }
}
