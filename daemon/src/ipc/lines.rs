//! Reading request lines with a maximum length, without ending the stream on bad lines.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, LinesCodec, LinesCodecError};

/// One line from a client, or why it could not be one.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line, without its newline.
    Text(String),
    /// The line was longer than the limit; the rest of it was skipped.
    TooLong,
    /// The line was not UTF-8.
    NotUtf8,
}

/// `LinesCodec` with its per-line errors turned into items.
///
/// `FramedRead` ends the stream after a decoder error, but a bad line from a client must
/// get an error reply and leave the connection usable, so those errors become values.
#[derive(Debug)]
pub struct LineDecoder(LinesCodec);

impl LineDecoder {
    /// A decoder refusing lines longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        LineDecoder(LinesCodec::new_with_max_length(max))
    }
}

impl Decoder for LineDecoder {
    type Item = Line;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, std::io::Error> {
        map(self.0.decode(buf))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, std::io::Error> {
        map(self.0.decode_eof(buf))
    }
}

fn map(r: Result<Option<String>, LinesCodecError>) -> Result<Option<Line>, std::io::Error> {
    match r {
        Ok(line) => Ok(line.map(Line::Text)),
        Err(LinesCodecError::MaxLineLengthExceeded) => Ok(Some(Line::TooLong)),
        Err(LinesCodecError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            Ok(Some(Line::NotUtf8))
        }
        Err(LinesCodecError::Io(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_do_not_end_the_stream() {
        let mut d = LineDecoder::new(8);
        let mut buf = BytesMut::from(&b"ok\n0123456789abc\nnext\n\xff\xfe\nlast\n"[..]);
        let mut got = Vec::new();
        while let Some(line) = d.decode(&mut buf).unwrap() {
            got.push(line);
        }
        assert_eq!(
            got,
            [
                Line::Text("ok".into()),
                Line::TooLong,
                Line::Text("next".into()),
                Line::NotUtf8,
                Line::Text("last".into())
            ]
        );
    }
}
