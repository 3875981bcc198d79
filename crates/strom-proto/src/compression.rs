//! Record-batch compression codecs. Decompression is always bounded: the output never exceeds
//! the caller's limit, whatever sizes the input claims, so a small hostile batch cannot make
//! the broker allocate gigabytes.

use std::io::{Read, Write};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

#[derive(Debug, thiserror::Error)]
pub enum CompressionError {
    #[error("unknown compression codec {0}")]
    UnknownCodec(i16),
    #[error("decompressed data exceeds the limit of {0} bytes")]
    DecompressedTooLarge(usize),
    #[error("corrupt compressed data: {0}")]
    Corrupt(String),
}

/// The xerial snappy-java stream header: magic, version 1, compatible version 1.
const XERIAL_MAGIC: [u8; 8] = [0x82, b'S', b'N', b'A', b'P', b'P', b'Y', 0];
const XERIAL_HEADER_LEN: usize = 16;
/// zstd frames asking for a larger window than 2^24 bytes are refused (bounded memory).
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

impl Compression {
    pub fn from_attributes(attributes: i16) -> Result<Self, CompressionError> {
        match attributes & 0x07 {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Gzip),
            2 => Ok(Compression::Snappy),
            3 => Ok(Compression::Lz4),
            4 => Ok(Compression::Zstd),
            other => Err(CompressionError::UnknownCodec(other)),
        }
    }

    pub fn attribute_bits(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }
}

fn corrupt(e: impl std::fmt::Display) -> CompressionError {
    CompressionError::Corrupt(e.to_string())
}

/// Reads at most `max + 1` bytes so that "exactly max" and "more than max" differ.
fn read_bounded<R: Read>(reader: R, max: usize) -> Result<Vec<u8>, CompressionError> {
    let mut out = Vec::new();
    reader
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(corrupt)?;
    if out.len() > max {
        return Err(CompressionError::DecompressedTooLarge(max));
    }
    Ok(out)
}

fn snappy_raw(block: &[u8], budget: usize, out: &mut Vec<u8>) -> Result<(), CompressionError> {
    let len = snap::raw::decompress_len(block).map_err(corrupt)?;
    if len > budget {
        return Err(CompressionError::DecompressedTooLarge(out.len() + budget));
    }
    let start = out.len();
    out.resize(start + len, 0);
    snap::raw::Decoder::new()
        .decompress(block, &mut out[start..])
        .map_err(corrupt)?;
    Ok(())
}

pub fn decompress(
    codec: Compression,
    input: &[u8],
    max_output_bytes: usize,
) -> Result<Vec<u8>, CompressionError> {
    match codec {
        Compression::None => {
            if input.len() > max_output_bytes {
                return Err(CompressionError::DecompressedTooLarge(max_output_bytes));
            }
            Ok(input.to_vec())
        }
        Compression::Gzip => {
            read_bounded(flate2::read::MultiGzDecoder::new(input), max_output_bytes)
        }
        Compression::Lz4 => {
            read_bounded(lz4_flex::frame::FrameDecoder::new(input), max_output_bytes)
        }
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::new(input).map_err(corrupt)?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(corrupt)?;
            read_bounded(d, max_output_bytes)
        }
        Compression::Snappy => {
            let mut out = Vec::new();
            if input.len() >= XERIAL_HEADER_LEN && input[..8] == XERIAL_MAGIC {
                let mut pos = XERIAL_HEADER_LEN;
                while pos < input.len() {
                    if input.len() - pos < 4 {
                        return Err(corrupt("truncated xerial block length"));
                    }
                    let len = u32::from_be_bytes([
                        input[pos],
                        input[pos + 1],
                        input[pos + 2],
                        input[pos + 3],
                    ]) as usize;
                    pos += 4;
                    if len > input.len() - pos {
                        return Err(corrupt("truncated xerial block"));
                    }
                    let budget = max_output_bytes - out.len();
                    snappy_raw(&input[pos..pos + len], budget, &mut out)?;
                    pos += len;
                }
            } else {
                snappy_raw(input, max_output_bytes, &mut out)?;
            }
            Ok(out)
        }
    }
}

pub fn compress(codec: Compression, input: &[u8]) -> Result<Vec<u8>, CompressionError> {
    match codec {
        Compression::None => Ok(input.to_vec()),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(input).map_err(corrupt)?;
            e.finish().map_err(corrupt)
        }
        Compression::Lz4 => {
            let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
            e.write_all(input).map_err(corrupt)?;
            e.finish().map_err(corrupt)
        }
        Compression::Zstd => zstd::stream::encode_all(input, 3).map_err(corrupt),
        Compression::Snappy => {
            // xerial framing, as the Java client writes it.
            let mut out = XERIAL_MAGIC.to_vec();
            out.extend_from_slice(&1i32.to_be_bytes());
            out.extend_from_slice(&1i32.to_be_bytes());
            for chunk in input.chunks(32 * 1024) {
                let block = snap::raw::Encoder::new()
                    .compress_vec(chunk)
                    .map_err(corrupt)?;
                out.extend_from_slice(&(block.len() as u32).to_be_bytes());
                out.extend_from_slice(&block);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];

    #[test]
    fn every_codec_round_trips() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for c in ALL {
            let z = compress(c, &data).unwrap();
            assert_eq!(decompress(c, &z, data.len()).unwrap(), data, "{c:?}");
        }
    }

    #[test]
    fn raw_snappy_is_accepted() {
        let data = b"hello hello hello hello".repeat(100);
        let z = snap::raw::Encoder::new().compress_vec(&data).unwrap();
        assert_eq!(decompress(Compression::Snappy, &z, 1 << 20).unwrap(), data);
    }

    #[test]
    fn bombs_are_refused_at_the_limit() {
        let zeros = vec![0u8; 8 << 20];
        for c in ALL {
            let z = compress(c, &zeros).unwrap();
            assert!(
                matches!(
                    decompress(c, &z, 1 << 20),
                    Err(CompressionError::DecompressedTooLarge(_))
                ),
                "{c:?}"
            );
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let junk: Vec<u8> = (0..500u32).map(|i| (i * 7919 % 256) as u8).collect();
        for c in ALL.into_iter().skip(1) {
            assert!(decompress(c, &junk, 1 << 20).is_err(), "{c:?}");
        }
    }
}
