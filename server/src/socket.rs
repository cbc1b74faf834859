//! WebSocket frames on an upgraded connection.
//!
//! fastwebsockets performs the upgrade and encodes what the server sends ([`FrameWriter`]).
//! Incoming frames are parsed by [`FrameReader`], which holds no buffer while the client is
//! silent: fastwebsockets' reader keeps an 8 KiB buffer for a connection's whole life, which
//! would be most of what an idle connection costs. Here bytes wait in a buffer only while a
//! frame is partly received; a silent socket is polled with a buffer on the stack.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use fastwebsockets::{Frame, OpCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// An upgraded connection.
pub(crate) type Socket = TokioIo<Upgraded>;

/// Bytes read at once from a silent socket, on the stack.
const CHUNK: usize = 4096;

/// The most bytes a frame header takes: 2, a 64-bit length, a mask.
const MAX_HEADER: usize = 14;

/// A complete message (fragments joined) or a control frame.
#[derive(Debug)]
pub(crate) struct Message {
    pub(crate) opcode: OpCode,
    pub(crate) payload: Vec<u8>,
}

/// Why reading stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// The client closed the socket without a close frame.
    #[error("the socket closed")]
    Eof,
    /// A message is larger than the limit.
    #[error("a message exceeded the maximum size")]
    TooLarge,
    /// The client broke the WebSocket protocol (close code 1002).
    #[error("{0}")]
    Protocol(&'static str),
    /// A text message is not UTF-8 (close code 1007).
    #[error("a text message is not valid UTF-8")]
    InvalidUtf8,
}

impl ReadError {
    /// The close code that answers it, when the socket can still take one.
    pub(crate) fn close_code(&self) -> Option<u16> {
        match self {
            Self::Io(_) | Self::Eof => None,
            Self::TooLarge => Some(1009),
            Self::Protocol(_) => Some(1002),
            Self::InvalidUtf8 => Some(1007),
        }
    }
}

/// A parsed frame header.
struct Header {
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    /// Header bytes.
    size: usize,
    len: usize,
}

/// Reads client frames (masked, as RFC 6455 requires) and joins fragmented messages.
pub(crate) struct FrameReader<R> {
    io: R,
    /// Bytes read and not yet consumed start at `start`; empty (and unallocated) between
    /// frames.
    buf: Vec<u8>,
    start: usize,
    /// The opcode and payload so far of a fragmented message.
    fragments: Option<(OpCode, Vec<u8>)>,
    max_message_size: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads from `io`; messages over `max_message_size` bytes are refused.
    pub(crate) fn new(io: R, max_message_size: usize) -> Self {
        Self {
            io,
            buf: Vec::new(),
            start: 0,
            fragments: None,
            max_message_size,
        }
    }

    /// The next message or control frame.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: bytes read stay buffered for the next call.
    pub(crate) async fn read(&mut self) -> Result<Message, ReadError> {
        loop {
            match self.parse()? {
                Ok(message) => return Ok(message),
                Err(needed) => self.fill(needed).await?,
            }
        }
    }

    /// A message from the buffered bytes, or how many more bytes the next step needs.
    fn parse(&mut self) -> Result<Result<Message, usize>, ReadError> {
        loop {
            let available = &self.buf[self.start..];
            let header = match parse_header(available)? {
                Ok(header) => header,
                Err(needed) => return Ok(Err(needed)),
            };
            if header.opcode == OpCode::Ping
                || header.opcode == OpCode::Pong
                || header.opcode == OpCode::Close
            {
                if !header.fin || header.len > 125 {
                    return Err(ReadError::Protocol(
                        "a control frame is fragmented or too long",
                    ));
                }
            } else {
                let so_far = self.fragments.as_ref().map_or(0, |(_, p)| p.len());
                if so_far.saturating_add(header.len) > self.max_message_size {
                    return Err(ReadError::TooLarge);
                }
            }
            let frame_len = header.size.saturating_add(header.len);
            if available.len() < frame_len {
                return Ok(Err(frame_len - available.len()));
            }
            let mut payload = available[header.size..frame_len].to_vec();
            self.consume(frame_len);
            fastwebsockets::unmask(&mut payload, header.mask);
            let message = match (header.opcode, self.fragments.take()) {
                (OpCode::Ping | OpCode::Pong | OpCode::Close, fragments) => {
                    self.fragments = fragments;
                    Message {
                        opcode: header.opcode,
                        payload,
                    }
                }
                (OpCode::Text | OpCode::Binary, None) if header.fin => Message {
                    opcode: header.opcode,
                    payload,
                },
                (OpCode::Text | OpCode::Binary, None) => {
                    self.fragments = Some((header.opcode, payload));
                    continue;
                }
                (OpCode::Continuation, Some((opcode, mut joined))) => {
                    joined.extend_from_slice(&payload);
                    if !header.fin {
                        self.fragments = Some((opcode, joined));
                        continue;
                    }
                    Message {
                        opcode,
                        payload: joined,
                    }
                }
                (OpCode::Continuation, None) => {
                    return Err(ReadError::Protocol(
                        "a continuation frame starts no message",
                    ));
                }
                (_, Some(_)) => {
                    return Err(ReadError::Protocol(
                        "a new message began before the fragmented one ended",
                    ));
                }
            };
            if message.opcode == OpCode::Text && std::str::from_utf8(&message.payload).is_err() {
                return Err(ReadError::InvalidUtf8);
            }
            return Ok(Ok(message));
        }
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            // Nothing pending: give the buffer back.
            self.buf = Vec::new();
            self.start = 0;
        }
    }

    /// Reads at least one more byte. With nothing buffered the bytes land in a buffer on the
    /// stack first, so a silent socket is waited on with no memory of its own; a frame in
    /// progress is read straight into the buffer, sized for what it still needs.
    async fn fill(&mut self, needed: usize) -> Result<(), ReadError> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let read = if self.buf.is_empty() {
            let buf = &mut self.buf;
            read_chunk(&mut self.io, |bytes| buf.extend_from_slice(bytes)).await?
        } else {
            self.buf.reserve(needed.max(CHUNK));
            self.io.read_buf(&mut self.buf).await?
        };
        if read == 0 {
            return Err(ReadError::Eof);
        }
        Ok(())
    }

    /// Reads and drops what the client still sends until it closes its side, after the
    /// server's close frame: a socket closed with unread bytes is reset, and a reset can
    /// destroy the close frame before the client reads it. Bound it with a timeout.
    pub(crate) async fn drain(&mut self) {
        self.buf = Vec::new();
        self.start = 0;
        self.fragments = None;
        while let Ok(1..) = read_chunk(&mut self.io, |_| {}).await {}
    }

    /// Whether bytes of an unfinished frame or message are held.
    #[cfg(test)]
    fn holds_bytes(&self) -> bool {
        self.buf.capacity() > 0 || self.fragments.is_some()
    }
}

/// Reads once into a buffer on the stack and hands the bytes to `sink`: waiting holds no
/// memory, as the buffer exists only while the socket is polled.
async fn read_chunk<R: AsyncRead + Unpin>(
    io: &mut R,
    mut sink: impl FnMut(&[u8]),
) -> io::Result<usize> {
    poll_fn(|cx| {
        let mut chunk = [0u8; CHUNK];
        let mut read = ReadBuf::new(&mut chunk);
        match Pin::new(&mut *io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                sink(read.filled());
                Poll::Ready(Ok(read.filled().len()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// A frame header from `bytes`, or how many more bytes it needs.
fn parse_header(bytes: &[u8]) -> Result<Result<Header, usize>, ReadError> {
    let [b0, b1, ..] = *bytes else {
        return Ok(Err(2 - bytes.len()));
    };
    if b0 & 0x70 != 0 {
        return Err(ReadError::Protocol("reserved bits are set"));
    }
    let opcode = match b0 & 0x0f {
        0x0 => OpCode::Continuation,
        0x1 => OpCode::Text,
        0x2 => OpCode::Binary,
        0x8 => OpCode::Close,
        0x9 => OpCode::Ping,
        0xa => OpCode::Pong,
        _ => return Err(ReadError::Protocol("unknown opcode")),
    };
    if b1 & 0x80 == 0 {
        return Err(ReadError::Protocol("a client frame is not masked"));
    }
    let (extra, short) = match b1 & 0x7f {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(usize::from(n))),
    };
    let size = 2 + extra + 4;
    if bytes.len() < size {
        return Ok(Err(size - bytes.len()));
    }
    let len = match (short, extra) {
        (Some(n), _) => n,
        (None, 2) => usize::from(u16::from_be_bytes([bytes[2], bytes[3]])),
        _ => {
            let mut be = [0u8; 8];
            be.copy_from_slice(&bytes[2..10]);
            // Lengths past the address space are over any limit.
            usize::try_from(u64::from_be_bytes(be)).unwrap_or(usize::MAX)
        }
    };
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&bytes[size - 4..size]);
    debug_assert!(size <= MAX_HEADER);
    Ok(Ok(Header {
        fin: b0 & 0x80 != 0,
        opcode,
        mask,
        size,
        len,
    }))
}

/// Writes server frames (unmasked) with fastwebsockets' encoder: header and payload in one
/// vectored write.
pub(crate) struct FrameWriter<W> {
    io: W,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Writes to `io`.
    pub(crate) fn new(io: W) -> Self {
        Self { io }
    }

    /// Writes one frame.
    pub(crate) async fn write(&mut self, mut frame: Frame<'_>) -> io::Result<()> {
        frame.writev(&mut self.io).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastwebsockets::Payload;
    use tokio::io::AsyncWriteExt;

    /// A client frame: masked.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        let n = payload.len();
        match (u8::try_from(n), u16::try_from(n)) {
            (Ok(short), _) if short < 126 => out.push(0x80 | short),
            (_, Ok(medium)) => {
                out.push(0x80 | 126);
                out.extend_from_slice(&medium.to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    async fn read_all(bytes: Vec<u8>, max: usize) -> Vec<Result<Message, ReadError>> {
        let (mut client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            // Small writes: frames arrive split at every boundary.
            for chunk in bytes.chunks(7) {
                if client.write_all(chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut reader = FrameReader::new(server, max);
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout(std::time::Duration::from_secs(5), reader.read())
                .await
                .expect("no hang");
            let stop = next.is_err();
            out.push(next);
            if stop {
                break;
            }
        }
        assert!(!reader.holds_bytes() || out.last().is_some_and(|r| r.is_err()));
        // The writer may be blocked on bytes nobody reads any more.
        drop(reader);
        writer.await.unwrap();
        out
    }

    #[tokio::test]
    async fn reads_messages_split_anywhere_and_joins_fragments() {
        let big = vec![b'x'; 70_000];
        let mut bytes = frame(true, 1, b"{\"type\":6}\x1e");
        bytes.extend(frame(false, 2, b"ab"));
        bytes.extend(frame(true, 9, b"ping"));
        bytes.extend(frame(false, 0, b"cd"));
        bytes.extend(frame(true, 0, b"ef"));
        bytes.extend(frame(true, 1, &big));
        bytes.extend(frame(true, 1, &vec![b'y'; 300]));
        let out = read_all(bytes, 1 << 20).await;
        let got: Vec<_> = out
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|m| (m.opcode, m.payload.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (OpCode::Text, b"{\"type\":6}\x1e".to_vec()),
                (OpCode::Ping, b"ping".to_vec()),
                (OpCode::Binary, b"abcdef".to_vec()),
                (OpCode::Text, big),
                (OpCode::Text, vec![b'y'; 300]),
            ]
        );
        assert!(matches!(out.last(), Some(Err(ReadError::Eof))));
    }

    #[tokio::test]
    async fn refuses_what_the_protocol_forbids() {
        let unmasked = vec![0x81, 0x02, b'h', b'i'];
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (unmasked, 1002),
            (frame(true, 0x3, b""), 1002),
            (frame(true, 0x41, b"x"), 1002),
            (frame(true, 0, b"orphan"), 1002),
            (frame(false, 9, b""), 1002),
            (frame(true, 9, &[0; 126]), 1002),
            ([frame(false, 1, b"a"), frame(true, 1, b"b")].concat(), 1002),
            (frame(true, 1, &[0xff, 0xfe]), 1007),
            (frame(true, 2, &[0; 101]), 1009),
            (
                [frame(false, 2, &[0; 60]), frame(true, 0, &[0; 41])].concat(),
                1009,
            ),
        ];
        for (bytes, code) in cases {
            let out = read_all(bytes.clone(), 100).await;
            let err = out.last().unwrap().as_ref().unwrap_err();
            assert_eq!(err.close_code(), Some(code), "{bytes:?}: {err}");
        }
    }

    #[tokio::test]
    async fn a_huge_declared_length_is_refused_before_any_payload_is_read() {
        let mut bytes = vec![0x82, 0x80 | 127];
        bytes.extend_from_slice(&u64::MAX.to_be_bytes());
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        let out = read_all(bytes, 1 << 20).await;
        assert!(matches!(out.last(), Some(Err(ReadError::TooLarge))));
    }

    #[tokio::test]
    async fn written_frames_read_back() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let mut writer = FrameWriter::new(server);
        writer
            .write(Frame::text(Payload::Borrowed(&[b'z'; 2000])))
            .await
            .unwrap();
        writer.write(Frame::close(1000, b"")).await.unwrap();
        drop(writer);
        let mut raw = Vec::new();
        let mut client = client;
        client.read_to_end(&mut raw).await.unwrap();
        // Server frames are unmasked: FIN|text, 126, length, payload.
        assert_eq!(&raw[..4], &[0x81, 126, 0x07, 0xd0]);
        assert_eq!(raw.len(), 4 + 2000 + 4);
        assert_eq!(&raw[2004..], &[0x88, 2, 0x03, 0xe8]);
    }
}
