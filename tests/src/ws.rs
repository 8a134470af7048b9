//! The 0.2 server's own WebSocket framing (RFC 6455 section 5), pure and unit tested here.
//!
//! The real 0.2 server frames by hand and does things no WebSocket library does: it ignores
//! FIN (the first fragment of a message is routed as a whole event and the continuation frame
//! closes the connection), it throws away whatever arrived in the same read as `/qio/ohai`,
//! and it closes with its own codes. Reproducing that needs frame-level access, which
//! tungstenite does not give a server, so 0.2 connections read and write frames with this
//! module (0.1 connections still use tungstenite).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Continuation frame.
pub(crate) const OP_CONTINUATION: u8 = 0x0;
/// Text frame.
pub(crate) const OP_TEXT: u8 = 0x1;
/// Binary frame.
pub(crate) const OP_BINARY: u8 = 0x2;
/// Close frame.
pub(crate) const OP_CLOSE: u8 = 0x8;
/// Ping frame.
pub(crate) const OP_PING: u8 = 0x9;
/// Pong frame.
pub(crate) const OP_PONG: u8 = 0xA;

/// One frame as a client sent it (unmasked already when it was masked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawFrame {
    /// The FIN bit (the server ignores it, but tests may look).
    pub(crate) fin: bool,
    /// The opcode (low 4 bits of the first byte).
    pub(crate) opcode: u8,
    /// Whether the client masked the payload, as RFC 6455 requires of clients.
    pub(crate) masked: bool,
    /// The payload.
    pub(crate) payload: Bytes,
}

/// A frame whose announced payload is larger than the limit: the connection is dropped
/// without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooLarge {
    /// The announced payload length (saturated to `usize`).
    pub(crate) size: usize,
    /// The limit.
    pub(crate) max: usize,
}

/// Takes the first complete frame off `buf`; `Ok(None)` when `buf` holds only part of one
/// (nothing is consumed then). A frame announcing more than `max` payload bytes is an error
/// as soon as its header is complete.
pub(crate) fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<RawFrame>, TooLarge> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let masked = b1 & 0x80 != 0;
    let (len, mut header) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n), 10)
        }
        n => (u64::from(n), 2),
    };
    let size = usize::try_from(len).unwrap_or(usize::MAX);
    if size > max {
        return Err(TooLarge { size, max });
    }
    let mask_at = header;
    if masked {
        header += 4;
    }
    if buf.len() < header + size {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    if masked {
        mask.copy_from_slice(&buf[mask_at..mask_at + 4]);
    }
    buf.advance(header);
    let mut payload = buf.split_to(size);
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(Some(RawFrame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        masked,
        payload: payload.freeze(),
    }))
}

/// Appends one unmasked, final frame (servers never mask).
pub(crate) fn encode(out: &mut BytesMut, opcode: u8, payload: &[u8]) {
    out.reserve(payload.len() + 10);
    out.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
}

/// The payload of a close frame: empty without a code (the peer sees 1005, "no status"),
/// else the code and the reason text.
pub(crate) fn close_payload(code: Option<(u16, &str)>) -> Vec<u8> {
    match code {
        None => Vec::new(),
        Some((code, reason)) => {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(reason.as_bytes());
            p
        }
    }
}

/// The status code of a close frame's payload, if it has one.
pub(crate) fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked with `mask` unless it is `None`.
    fn client(b0: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(&mut out, 0, payload);
        let mut v = out.to_vec();
        v[0] = b0;
        if let Some(mask) = mask {
            let at = v.len() - payload.len();
            v[1] |= 0x80;
            let mut body: Vec<u8> = payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            v.truncate(at);
            v.extend_from_slice(&mask);
            v.append(&mut body);
        }
        v
    }

    #[test]
    fn decodes_masked_and_unmasked_frames_of_every_length_form() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for mask in [Some([1, 2, 3, 4]), None] {
                let bytes = client(0x81, &payload, mask);
                let mut buf = BytesMut::from(&bytes[..]);
                let f = decode(&mut buf, usize::MAX).unwrap().unwrap();
                assert_eq!(f.payload, payload, "len {len}");
                assert_eq!((f.fin, f.opcode, f.masked), (true, 1, mask.is_some()));
                assert!(buf.is_empty());
                // Every strict prefix is incomplete and consumes nothing.
                for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
                    let mut part = BytesMut::from(&bytes[..cut.min(bytes.len())]);
                    if cut < bytes.len() {
                        assert_eq!(
                            decode(&mut part, usize::MAX),
                            Ok(None),
                            "len {len} cut {cut}"
                        );
                        assert_eq!(part.len(), cut);
                    }
                }
            }
        }
    }

    #[test]
    fn keeps_what_follows_and_reports_fin_and_opcode() {
        let mut bytes = client(0x01, b"/a:0=1", Some([9, 9, 9, 9]));
        bytes.extend(client(0x80, b"2", Some([7, 0, 7, 0])));
        let mut buf = BytesMut::from(&bytes[..]);
        let first = decode(&mut buf, 100).unwrap().unwrap();
        assert_eq!((first.fin, first.opcode), (false, OP_TEXT));
        assert_eq!(first.payload, &b"/a:0=1"[..]);
        let second = decode(&mut buf, 100).unwrap().unwrap();
        assert_eq!((second.fin, second.opcode), (true, OP_CONTINUATION));
        assert_eq!(decode(&mut buf, 100), Ok(None));
    }

    #[test]
    fn refuses_oversized_frames_from_the_header_alone() {
        let mut buf = BytesMut::from(&[0x81u8, 0xff, 0, 0, 0, 1, 0, 0, 0, 0][..]);
        assert_eq!(
            decode(&mut buf, 1024),
            Err(TooLarge {
                size: 1 << 32,
                max: 1024
            })
        );
        let mut buf = BytesMut::from(&client(0x81, &[b'x'; 11], None)[..]);
        assert_eq!(decode(&mut buf, 10), Err(TooLarge { size: 11, max: 10 }));
    }

    #[test]
    fn encodes_server_frames() {
        let mut out = BytesMut::new();
        encode(&mut out, OP_TEXT, b"/qio/ohai");
        assert_eq!(&out[..2], &[0x81, 9]);
        let mut out = BytesMut::new();
        encode(&mut out, OP_CLOSE, &close_payload(None));
        assert_eq!(&out[..], &[0x88, 0]);
        let p = close_payload(Some((1002, "invalid event format")));
        assert_eq!(close_code(&p), Some(1002));
        assert_eq!(&p[2..], b"invalid event format");
        assert_eq!(close_code(&[]), None);
        let mut out = BytesMut::new();
        encode(&mut out, OP_TEXT, &[0u8; 300]);
        assert_eq!(&out[..4], &[0x81, 126, 1, 44]);
    }
}
