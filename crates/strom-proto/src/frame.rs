//! Length-prefixed frames. The 4-byte size is checked against the configured limit before a
//! single byte of the body is allocated, so a hostile or broken peer cannot make us reserve
//! memory it never sends.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why a frame could not be read. Every variant ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame size {size} is negative or above the limit of {max} bytes (socket.request.max.bytes)")]
    TooLarge { size: i64, max: usize },
    #[error("frame of {0} bytes is too short to hold a request header")]
    TooShort(usize),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads one frame. `Ok(None)` is a clean close between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_bytes: usize,
) -> Result<Option<Bytes>, FrameError> {
    match read_frame_size(reader, max_bytes).await? {
        None => Ok(None),
        Some(size) => read_frame_body(reader, size).await.map(Some),
    }
}

/// Reads and checks a frame's size field. `Ok(None)` is a clean close between frames.
pub async fn read_frame_size<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_bytes: usize,
) -> Result<Option<usize>, FrameError> {
    let mut size_buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = reader.read(&mut size_buf[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let size = i32::from_be_bytes(size_buf);
    if size < 0 || size as usize > max_bytes {
        return Err(FrameError::TooLarge {
            size: size as i64,
            max: max_bytes,
        });
    }
    let size = size as usize;
    // api key (2) + api version (2) + correlation id (4) is the least any request carries.
    if size < 8 {
        return Err(FrameError::TooShort(size));
    }
    Ok(Some(size))
}

/// Reads a frame body of `size` bytes (already checked by `read_frame_size`).
pub async fn read_frame_body<R: AsyncRead + Unpin>(
    reader: &mut R,
    size: usize,
) -> Result<Bytes, FrameError> {
    // Memory is committed as bytes arrive, not as the size field promises: a peer that
    // announces 100 MiB and sends nothing holds 64 KiB, not 100 MiB.
    let mut body = BytesMut::with_capacity(size.min(READ_CHUNK_BYTES));
    while body.len() < size {
        let want = (size - body.len()).min(READ_CHUNK_BYTES);
        body.reserve(want);
        let n = (&mut *reader).take(want as u64).read_buf(&mut body).await?;
        if n == 0 {
            return Err(FrameError::Truncated);
        }
    }
    Ok(body.freeze())
}

const READ_CHUNK_BYTES: usize = 64 * 1024;
