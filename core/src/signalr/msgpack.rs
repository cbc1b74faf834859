//! The MessagePack hub protocol: each message is a MessagePack array, framed by its length as a
//! variable-length integer (7 bits per byte, low bits first, at most 5 bytes).
//!
//! Arguments, results and items travel as [`serde_json::Value`]s on both sides, so hub code is
//! the same for both protocols. MessagePack values that have no JSON form (binary, extension
//! types such as timestamps, maps with non-string keys) are refused with a clear error.

use serde_json::{Map, Value};

use super::{
    HubMessage, Outcome, ProtocolError, arguments, bad, optional_string, stream_ids, string,
    unsigned,
};

const RESULT_ERROR: u64 = 1;
const RESULT_VOID: u64 = 2;
const RESULT_VALUE: u64 = 3;

/// The largest length prefix: 5 bytes hold up to 2^35 - 1, more than any message allowed.
const MAX_PREFIX: usize = 5;

/// Appends the length prefix of a `len`-byte message.
pub(crate) fn put_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let low = u8::try_from(len & 0x7f).unwrap_or_default();
        len >>= 7;
        if len == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

/// Reads a length prefix: `Ok(Some((length, prefix bytes)))`, `Ok(None)` when more bytes are
/// needed.
pub(crate) fn read_length(data: &[u8]) -> Result<Option<(usize, usize)>, ProtocolError> {
    let mut len = 0usize;
    for (i, byte) in data.iter().take(MAX_PREFIX).enumerate() {
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((len, i + 1)));
        }
    }
    if data.len() >= MAX_PREFIX {
        return Err(bad("a MessagePack length prefix is longer than 5 bytes"));
    }
    Ok(None)
}

/// The framed MessagePack form of `message`.
pub(crate) fn encode(message: &HubMessage) -> Vec<u8> {
    let headers = || Value::Object(Map::new());
    let array = match message {
        HubMessage::Invocation {
            invocation_id,
            target,
            arguments,
            stream_ids,
        } => vec![
            1.into(),
            headers(),
            invocation_id.clone().map_or(Value::Null, Value::String),
            target.clone().into(),
            Value::Array(arguments.clone()),
            // Always six elements, as ASP.NET Core writes them: clients that read the
            // sixth fail on five.
            stream_ids.clone().into(),
        ],
        HubMessage::StreamItem {
            invocation_id,
            item,
        } => vec![
            2.into(),
            headers(),
            invocation_id.clone().into(),
            item.clone(),
        ],
        HubMessage::Completion {
            invocation_id,
            outcome,
        } => {
            let mut items = vec![3.into(), headers(), invocation_id.clone().into()];
            match outcome {
                Outcome::Error(error) => {
                    items.push(RESULT_ERROR.into());
                    items.push(error.clone().into());
                }
                Outcome::Void => items.push(RESULT_VOID.into()),
                Outcome::Result(value) => {
                    items.push(RESULT_VALUE.into());
                    items.push(value.clone());
                }
            }
            items
        }
        HubMessage::StreamInvocation {
            invocation_id,
            target,
            arguments,
            stream_ids,
        } => vec![
            4.into(),
            headers(),
            invocation_id.clone().into(),
            target.clone().into(),
            Value::Array(arguments.clone()),
            stream_ids.clone().into(),
        ],
        HubMessage::CancelInvocation { invocation_id } => {
            vec![5.into(), headers(), invocation_id.clone().into()]
        }
        HubMessage::Ping => vec![6.into()],
        HubMessage::Close {
            error,
            allow_reconnect,
        } => vec![
            7.into(),
            error.clone().map_or(Value::Null, Value::String),
            (*allow_reconnect).into(),
        ],
        HubMessage::Ack { sequence_id } => vec![8.into(), (*sequence_id).into()],
        HubMessage::Sequence { sequence_id } => vec![9.into(), (*sequence_id).into()],
    };
    // Plain JSON values always encode.
    let body = rmp_serde::to_vec(&Value::Array(array)).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + MAX_PREFIX);
    put_length(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// Parses one MessagePack message (without its length prefix).
pub(crate) fn parse(record: &[u8]) -> Result<HubMessage, ProtocolError> {
    let value: Value = rmp_serde::from_slice(record).map_err(|e| {
        bad(format!(
            "invalid MessagePack (or a value with no JSON form): {e}"
        ))
    })?;
    let Value::Array(items) = value else {
        return Err(bad("a MessagePack message must be an array"));
    };
    let kind = unsigned(items.first(), "type")?;
    Ok(match kind {
        1 => HubMessage::Invocation {
            invocation_id: optional_string(items.get(2), "invocationId")?,
            target: string(items.get(3), "target")?,
            arguments: arguments(items.get(4))?,
            stream_ids: stream_ids(items.get(5))?,
        },
        2 => HubMessage::StreamItem {
            invocation_id: string(items.get(2), "invocationId")?,
            item: items.get(3).cloned().unwrap_or(Value::Null),
        },
        3 => {
            let invocation_id = string(items.get(2), "invocationId")?;
            let outcome = match unsigned(items.get(3), "resultKind")? {
                RESULT_ERROR => Outcome::Error(string(items.get(4), "error")?),
                RESULT_VOID => Outcome::Void,
                RESULT_VALUE => Outcome::Result(items.get(4).cloned().unwrap_or(Value::Null)),
                other => return Err(bad(format!("unknown result kind {other}"))),
            };
            HubMessage::Completion {
                invocation_id,
                outcome,
            }
        }
        4 => HubMessage::StreamInvocation {
            invocation_id: string(items.get(2), "invocationId")?,
            target: string(items.get(3), "target")?,
            arguments: arguments(items.get(4))?,
            stream_ids: stream_ids(items.get(5))?,
        },
        5 => HubMessage::CancelInvocation {
            invocation_id: string(items.get(2), "invocationId")?,
        },
        6 => HubMessage::Ping,
        7 => HubMessage::Close {
            error: optional_string(items.get(1), "error")?,
            allow_reconnect: items.get(2).and_then(Value::as_bool).unwrap_or(false),
        },
        8 => HubMessage::Ack {
            sequence_id: unsigned(items.get(1), "sequenceId")?,
        },
        9 => HubMessage::Sequence {
            sequence_id: unsigned(items.get(1), "sequenceId")?,
        },
        other => return Err(bad(format!("unknown message type {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn length_prefixes_round_trip() {
        for len in [0, 1, 127, 128, 300, 16_383, 16_384, 2_000_000] {
            let mut out = Vec::new();
            put_length(&mut out, len);
            assert_eq!(read_length(&out).unwrap(), Some((len, out.len())), "{len}");
            assert_eq!(read_length(&out[..out.len() - 1]).unwrap(), None);
        }
        assert_eq!(read_length(&[0x7f]).unwrap(), Some((127, 1)));
        assert_eq!(read_length(&[0x80, 0x01]).unwrap(), Some((128, 2)));
        assert!(read_length(&[0xff; 6]).is_err());
    }

    #[test]
    fn matches_the_specification_bytes() {
        // From the hub protocol specification: a Ping is `[6]`, framed.
        assert_eq!(encode(&HubMessage::Ping), vec![0x02, 0x91, 0x06]);
        // An invocation without id, as ASP.NET Core writes it: [1, {}, nil, "Target", [42], []].
        let bytes = encode(&HubMessage::Invocation {
            invocation_id: None,
            target: "Target".into(),
            arguments: vec![json!(42)],
            stream_ids: vec![],
        });
        assert_eq!(
            bytes,
            [
                &[0x0e, 0x96, 0x01, 0x80, 0xc0, 0xa6][..],
                b"Target",
                &[0x91, 0x2a, 0x90]
            ]
            .concat()
        );
    }

    #[test]
    fn arities_match_aspnet_core() {
        // ASP.NET Core's MessagePackHubProtocolWorker: the array length of each message type.
        let arity = |message: HubMessage| {
            let framed = encode(&message);
            let (_, prefix) = read_length(&framed).unwrap().unwrap();
            match rmp_serde::from_slice::<Value>(&framed[prefix..]).unwrap() {
                Value::Array(items) => items.len(),
                other => panic!("not an array: {other}"),
            }
        };
        let invocation = |stream_ids: Vec<String>| HubMessage::Invocation {
            invocation_id: None,
            target: "T".into(),
            arguments: vec![],
            stream_ids,
        };
        assert_eq!(arity(invocation(vec![])), 6);
        assert_eq!(arity(invocation(vec!["s".into()])), 6);
        assert_eq!(
            arity(HubMessage::StreamInvocation {
                invocation_id: "1".into(),
                target: "T".into(),
                arguments: vec![],
                stream_ids: vec![],
            }),
            6
        );
        let item = HubMessage::StreamItem {
            invocation_id: "1".into(),
            item: json!(1),
        };
        assert_eq!(arity(item), 4);
        let completion = |outcome| HubMessage::Completion {
            invocation_id: "1".into(),
            outcome,
        };
        assert_eq!(arity(completion(Outcome::Void)), 4);
        assert_eq!(arity(completion(Outcome::Result(json!(1)))), 5);
        assert_eq!(arity(completion(Outcome::Error("e".into()))), 5);
        let cancel = HubMessage::CancelInvocation {
            invocation_id: "1".into(),
        };
        assert_eq!(arity(cancel), 3);
        assert_eq!(arity(HubMessage::Ping), 1);
        let close = HubMessage::Close {
            error: None,
            allow_reconnect: false,
        };
        assert_eq!(arity(close), 3);
        assert_eq!(arity(HubMessage::Ack { sequence_id: 1 }), 2);
        assert_eq!(arity(HubMessage::Sequence { sequence_id: 1 }), 2);
    }

    #[test]
    fn every_message_round_trips() {
        let messages = vec![
            HubMessage::Invocation {
                invocation_id: Some("1".into()),
                target: "Send".into(),
                arguments: vec![json!("a"), json!(2.5), json!({"k": [true, null]})],
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
                item: json!(-7),
            },
            HubMessage::Completion {
                invocation_id: "1".into(),
                outcome: Outcome::Result(json!("r")),
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
                target: "Count".into(),
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
            HubMessage::Sequence { sequence_id: 300 },
        ];
        for message in messages {
            let framed = encode(&message);
            let (len, prefix) = read_length(&framed).unwrap().unwrap();
            assert_eq!(prefix + len, framed.len());
            assert_eq!(parse(&framed[prefix..]).unwrap(), message);
        }
    }

    #[test]
    fn refuses_what_json_cannot_hold_and_malformed_messages() {
        // [1, {}, nil, "T", [bin8 "ab"]]
        let binary = [
            0x95, 0x01, 0x80, 0xc0, 0xa1, b'T', 0x91, 0xc4, 0x02, b'a', b'b',
        ];
        assert!(parse(&binary).is_err());
        for (input, reason) in [
            (&[0x91, 0x63][..], "unknown message type 99"),
            (&[0x06], "must be an array"),
            (&[0x90], "'type'"),
            (&[0x93, 0x01, 0x80, 0x05], "'invocationId' must be a string"),
            (&[0xc1], "invalid MessagePack"),
        ] {
            let err = parse(input).unwrap_err();
            assert!(err.0.contains(reason), "{input:?}: {err}");
        }
    }
}
