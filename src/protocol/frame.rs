//! Length-prefixed framing over a byte stream.
//!
//! ```text
//! +-------------------+----------------------------------+
//! | length: u32 (LE)  | payload: `length` bytes          |
//! +-------------------+----------------------------------+
//! ```
//!
//! The decoder is a pure two-state machine over a [`BytesMut`] (as tokio-util's
//! `LengthDelimitedCodec`): it returns `Ok(None)` while more bytes are needed, checks the
//! length against the cap *before* reserving memory, and never panics on any input.

use bytes::{Buf, BytesMut};
use std::fmt;

/// Bytes taken by the length prefix.
pub(crate) const HEAD_LEN: usize = 4;

/// Default cap on one frame's payload: 64 MiB.
pub(crate) const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;

/// A frame that breaks the framing rules. Fatal for the stream it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// The length prefix announces more than the cap allows.
    TooLarge { len: usize, max: usize },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the {max}-byte cap")
            }
        }
    }
}

impl std::error::Error for FrameError {}

#[derive(Debug, Clone, Copy)]
enum DecodeState {
    Head,
    Data(usize),
}

/// Splits complete frames off the front of a read buffer.
#[derive(Debug)]
pub(crate) struct FrameDecoder {
    state: DecodeState,
    max_frame: usize,
}

impl FrameDecoder {
    /// The largest payload it accepts.
    pub(crate) fn max_frame(&self) -> usize {
        self.max_frame
    }

    pub(crate) fn new(max_frame: usize) -> Self {
        FrameDecoder {
            state: DecodeState::Head,
            max_frame,
        }
    }

    /// Takes the next complete frame's payload out of `buf`, or `Ok(None)` if `buf` holds
    /// only part of it. Reserves room in `buf` for the rest of a partial frame, so the next
    /// read can fill it in one go.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        let len = match self.state {
            DecodeState::Data(len) => len,
            DecodeState::Head => {
                if buf.len() < HEAD_LEN {
                    buf.reserve(HEAD_LEN);
                    return Ok(None);
                }
                let len = buf.get_u32_le() as usize;
                if len > self.max_frame {
                    return Err(FrameError::TooLarge {
                        len,
                        max: self.max_frame,
                    });
                }
                self.state = DecodeState::Data(len);
                len
            }
        };
        if buf.len() < len {
            buf.reserve(len - buf.len());
            return Ok(None);
        }
        self.state = DecodeState::Head;
        Ok(Some(buf.split_to(len)))
    }
}

/// Starts a frame at the end of `out`; returns the offset to hand to [`finish`].
pub(crate) fn begin(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; HEAD_LEN]);
    start
}

/// Writes the length prefix of the frame started at `start`, checking it against the cap.
/// On error the partial frame is removed from `out`.
pub(crate) fn finish(out: &mut Vec<u8>, start: usize, max_frame: usize) -> Result<(), FrameError> {
    let len = out.len().saturating_sub(start + HEAD_LEN);
    match u32::try_from(len) {
        Ok(len32) if len <= max_frame => {
            out[start..start + HEAD_LEN].copy_from_slice(&len32.to_le_bytes());
            Ok(())
        }
        _ => {
            out.truncate(start);
            Err(FrameError::TooLarge {
                len,
                max: max_frame,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let start = begin(&mut out);
        out.extend_from_slice(payload);
        finish(&mut out, start, DEFAULT_MAX_FRAME).unwrap();
        out
    }

    #[test]
    fn incomplete_head_waits() {
        let mut dec = FrameDecoder::new(16);
        let mut buf = BytesMut::from(&[5u8, 0][..]);
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(&[0, 0, b'h', b'e']);
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"llo");
        assert_eq!(&dec.decode(&mut buf).unwrap().unwrap()[..], b"hello");
        assert!(buf.is_empty());
    }

    #[test]
    fn payload_split_across_reads() {
        let bytes = frame(b"split payload");
        let mut dec = FrameDecoder::new(64);
        let mut buf = BytesMut::new();
        let mut got = None;
        for b in bytes {
            buf.extend_from_slice(&[b]);
            if let Some(f) = dec.decode(&mut buf).unwrap() {
                got = Some(f);
            }
        }
        assert_eq!(&got.unwrap()[..], b"split payload");
    }

    #[test]
    fn many_frames_in_one_read() {
        let mut all = Vec::new();
        for i in 0..10u8 {
            all.extend(frame(&vec![i; i as usize]));
        }
        let mut buf = BytesMut::from(&all[..]);
        let mut dec = FrameDecoder::new(64);
        for i in 0..10u8 {
            assert_eq!(
                &dec.decode(&mut buf).unwrap().unwrap()[..],
                &vec![i; i as usize][..]
            );
        }
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn empty_payload() {
        let mut buf = BytesMut::from(&frame(b"")[..]);
        let mut dec = FrameDecoder::new(0);
        assert_eq!(&dec.decode(&mut buf).unwrap().unwrap()[..], b"");
    }

    #[test]
    fn max_length_in_flight_and_oversize() {
        let mut dec = FrameDecoder::new(8);
        let mut buf = BytesMut::from(&frame(&[1; 8])[..]);
        assert_eq!(dec.decode(&mut buf).unwrap().unwrap().len(), 8);
        let mut buf = BytesMut::from(&u32::MAX.to_le_bytes()[..]);
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 8
            })
        );
        // The cap is checked before any room is reserved for the payload.
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn finish_refuses_oversized_frames_and_rolls_back() {
        let mut out = vec![9, 9];
        let start = begin(&mut out);
        out.extend_from_slice(&[0; 10]);
        assert!(finish(&mut out, start, 9).is_err());
        assert_eq!(out, vec![9, 9]);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any byte stream, cut into any chunks, decodes to frames or a clean error.
        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048),
                                cuts in proptest::collection::vec(1usize..64, 0..32),
                                max in 0usize..512) {
            let mut dec = FrameDecoder::new(max);
            let mut buf = BytesMut::new();
            let mut rest = &data[..];
            let mut cuts = cuts.into_iter();
            while !rest.is_empty() {
                let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                loop {
                    match dec.decode(&mut buf) {
                        Ok(Some(frame)) => prop_assert!(frame.len() <= max),
                        Ok(None) => break,
                        Err(_) => return Ok(()),
                    }
                }
            }
        }

        /// Frames written by `begin`/`finish` come back unchanged, however the stream is cut.
        #[test]
        fn frames_round_trip(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
                             chunk in 1usize..100) {
            let mut stream = Vec::new();
            for p in &payloads {
                let start = begin(&mut stream);
                stream.extend_from_slice(p);
                finish(&mut stream, start, 1024).unwrap();
            }
            let mut dec = FrameDecoder::new(1024);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(f) = dec.decode(&mut buf).unwrap() {
                    got.push(f.to_vec());
                }
            }
            prop_assert_eq!(got, payloads);
        }

        /// Message parsers turn any payload into a message or an error.
        #[test]
        fn message_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = crate::protocol::decode_from_worker(bytes::Bytes::from(data.clone()));
            let _ = crate::protocol::decode_to_worker(bytes::Bytes::from(data));
        }
    }
}
