//! WebSocket frames on an upgraded connection.
//!
//! fastwebsockets performs the upgrade; frames are read and written here, by poll functions
//! that one task drives for both directions. Incoming frames are parsed by [`FrameReader`],
//! which holds no buffer while the client is silent: fastwebsockets' reader keeps an 8 KiB
//! buffer for a connection's whole life, which would be most of what an idle connection
//! costs. Here bytes wait in a buffer only while a frame is partly received; a silent socket
//! is polled with a buffer on the stack. What the server sends waits in an [`Outbox`], which
//! likewise holds memory only while bytes wait for the socket.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use fastwebsockets::OpCode;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An upgraded connection.
pub(crate) type Socket = TokioIo<Upgraded>;

/// Bytes read at once from a silent socket, on the stack.
const CHUNK: usize = 4096;

/// The most bytes read at once into a frame in progress.
const MAX_READ: usize = 64 * 1024;

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
        poll_fn(|cx| self.poll_read(cx)).await
    }

    /// Polls for the next message or control frame; bytes read stay buffered across calls.
    pub(crate) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Message, ReadError>> {
        loop {
            match self.parse()? {
                Ok(message) => return Poll::Ready(Ok(message)),
                Err(needed) => ready!(self.poll_fill(cx, needed))?,
            }
        }
    }

    /// The socket, to write to.
    pub(crate) fn get_mut(&mut self) -> &mut R {
        &mut self.io
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
    fn poll_fill(&mut self, cx: &mut Context<'_>, needed: usize) -> Poll<Result<(), ReadError>> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let read = if self.buf.is_empty() {
            let buf = &mut self.buf;
            ready!(poll_chunk(&mut self.io, cx, |bytes| buf.extend_from_slice(bytes)))?
        } else {
            let held = self.buf.len();
            self.buf.reserve(needed);
            self.buf.resize(held + needed.clamp(CHUNK, MAX_READ), 0);
            let mut read = ReadBuf::new(&mut self.buf[held..]);
            let polled = Pin::new(&mut self.io).poll_read(cx, &mut read);
            let n = read.filled().len();
            self.buf.truncate(held + n);
            ready!(polled)?;
            n
        };
        if read == 0 {
            return Poll::Ready(Err(ReadError::Eof));
        }
        Poll::Ready(Ok(()))
    }

    /// Reads and drops what the client still sends until it closes its side, after the
    /// server's close frame: a socket closed with unread bytes is reset, and a reset can
    /// destroy the close frame before the client reads it. Bound it with a timeout.
    pub(crate) async fn drain(&mut self) {
        self.buf = Vec::new();
        self.start = 0;
        self.fragments = None;
        while let Ok(1..) = poll_fn(|cx| poll_chunk(&mut self.io, cx, |_| {})).await {}
    }

    /// Whether bytes of an unfinished frame or message are held.
    #[cfg(test)]
    fn holds_bytes(&self) -> bool {
        self.buf.capacity() > 0 || self.fragments.is_some()
    }
}

/// Reads once into a buffer on the stack and hands the bytes to `sink`: waiting holds no
/// memory, as the buffer exists only while the socket is polled.
fn poll_chunk<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    sink: impl FnOnce(&[u8]),
) -> Poll<io::Result<usize>> {
    // Not zeroed: polled on every wake-up of the connection, most often with nothing to read.
    let mut chunk = [MaybeUninit::<u8>::uninit(); CHUNK];
    let mut read = ReadBuf::uninit(&mut chunk);
    ready!(Pin::new(io).poll_read(cx, &mut read))?;
    sink(read.filled());
    Poll::Ready(Ok(read.filled().len()))
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

/// Bytes a frame buffer keeps free at its front for the header: two, and a 64-bit length.
pub(crate) const HEADER_ROOM: usize = 10;

/// Writes the header of a server frame (final, unmasked) with `len` payload bytes into the
/// end of `room`; returns how many bytes it took.
fn put_header(room: &mut [u8; HEADER_ROOM], opcode: OpCode, len: usize) -> usize {
    let mut header = [0u8; HEADER_ROOM];
    header[0] = 0x80 | opcode as u8;
    let size = match (u8::try_from(len), u16::try_from(len)) {
        (Ok(short), _) if short <= 125 => {
            header[1] = short;
            2
        }
        (_, Ok(medium)) => {
            header[1] = 126;
            header[2..4].copy_from_slice(&medium.to_be_bytes());
            4
        }
        _ => {
            header[1] = 127;
            header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    };
    room[HEADER_ROOM - size..].copy_from_slice(&header[..size]);
    size
}

/// What the server sends on one socket: whole frames, written as fast as the socket takes
/// them. It holds memory only while bytes wait.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Frames being written; the first `sent` bytes are out.
    sending: Vec<u8>,
    sent: usize,
    /// Whole frames waiting behind them.
    queued: Vec<u8>,
}

impl Outbox {
    /// Queues a frame whose payload is `frame[HEADER_ROOM..]`: its header goes into the room
    /// before it, so a large frame is handed over without a copy when nothing else waits.
    pub(crate) fn push(&mut self, mut frame: Vec<u8>, opcode: OpCode) {
        let len = frame.len().saturating_sub(HEADER_ROOM);
        let Some(room) = frame.first_chunk_mut::<HEADER_ROOM>() else {
            return;
        };
        let start = HEADER_ROOM - put_header(room, opcode, len);
        if self.sending.is_empty() {
            self.sending = frame;
            self.sent = start;
        } else {
            self.queued.extend_from_slice(&frame[start..]);
        }
    }

    /// Queues a frame with a copy of `payload`.
    pub(crate) fn frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let mut room = [0u8; HEADER_ROOM];
        let start = HEADER_ROOM - put_header(&mut room, opcode, payload.len());
        let to = if self.sending.is_empty() {
            self.sent = 0;
            &mut self.sending
        } else {
            &mut self.queued
        };
        to.extend_from_slice(&room[start..]);
        to.extend_from_slice(payload);
    }

    /// Queues a close frame with `code` and `reason` (cut to what a control frame holds).
    pub(crate) fn close(&mut self, code: u16, reason: &str) {
        let mut payload = code.to_be_bytes().to_vec();
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        self.frame(OpCode::Close, &payload);
    }

    /// Whether everything queued has been written.
    pub(crate) fn is_empty(&self) -> bool {
        self.sending.is_empty()
    }

    /// How many bytes wait behind the frames being written.
    pub(crate) fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Drops what was not written (the socket is gone).
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }

    /// Writes what is queued; ready once all of it is written, and the memory freed.
    pub(crate) fn poll_flush<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.sent == self.sending.len() {
                if self.queued.is_empty() {
                    self.sending = Vec::new();
                    self.sent = 0;
                    return Pin::new(io).poll_flush(cx);
                }
                self.sending = std::mem::take(&mut self.queued);
                self.sent = 0;
            }
            match ready!(Pin::new(&mut *io).poll_write(cx, &self.sending[self.sent..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.sent += n,
            }
        }
    }

    /// Writes what is queued.
    pub(crate) async fn flush<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> io::Result<()> {
        poll_fn(|cx| self.poll_flush(io, cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut outbox = Outbox::default();
        let mut data = vec![0; HEADER_ROOM];
        data.extend_from_slice(&[b'z'; 2000]);
        outbox.push(data, OpCode::Text);
        outbox.frame(OpCode::Pong, b"hi");
        let mut big = vec![0; HEADER_ROOM];
        big.extend_from_slice(&[b'b'; 70_000]);
        outbox.push(big, OpCode::Binary);
        outbox.close(1000, "");
        assert!(outbox.queued() > 0);
        outbox.flush(&mut server).await.unwrap();
        assert!(outbox.is_empty());
        drop(server);
        let mut raw = Vec::new();
        let mut client = client;
        client.read_to_end(&mut raw).await.unwrap();
        // Server frames are unmasked: FIN|opcode, length, payload.
        assert_eq!(&raw[..4], &[0x81, 126, 0x07, 0xd0]);
        let raw = &raw[4 + 2000..];
        assert_eq!(&raw[..4], &[0x8a, 2, b'h', b'i']);
        let raw = &raw[4..];
        assert_eq!(&raw[..2], &[0x82, 127]);
        assert_eq!(&raw[2..10], &70_000u64.to_be_bytes());
        let raw = &raw[10 + 70_000..];
        assert_eq!(raw, &[0x88, 2, 0x03, 0xe8]);
    }

    #[test]
    fn a_close_reason_is_cut_to_fit_a_control_frame_on_a_character_boundary() {
        let mut outbox = Outbox::default();
        outbox.close(1008, &"é".repeat(100));
        // Header (2) + code (2) + at most 123 bytes of whole characters.
        assert_eq!(outbox.sending.len(), 2 + 2 + 122);
        assert_eq!(outbox.sending[1], 124);
    }
}
