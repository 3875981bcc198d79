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
    // announces 100 MiB and sends nothing holds 64 KiB, not 100 MiB. A peer that has sent the
    // first 64 KiB gets a buffer of the announced size at once (one copy of that chunk, where
    // growing the buffer by doubling copied the body over and over).
    let mut body = BytesMut::with_capacity(size.min(READ_CHUNK_BYTES));
    while body.len() < size {
        if body.len() == body.capacity() {
            let mut whole = BytesMut::with_capacity(size);
            whole.extend_from_slice(&body);
            body = whole;
        }
        let want = (size - body.len()) as u64;
        let n = (&mut *reader).take(want).read_buf(&mut body).await?;
        if n == 0 {
            return Err(FrameError::Truncated);
        }
    }
    Ok(body.freeze())
}

const READ_CHUNK_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as i32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    #[tokio::test]
    async fn a_large_body_arriving_in_pieces_is_read_whole() {
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let wire = frame(&body);
        let (mut tx, mut rx) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            for piece in wire.chunks(7_001) {
                tx.write_all(piece).await.unwrap();
            }
        });
        let got = read_frame(&mut rx, 1 << 20).await.unwrap().unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), body.len());
        assert!(got == body[..], "body bytes differ");
    }

    #[tokio::test]
    async fn a_body_cut_short_is_truncated_and_sizes_are_checked() {
        for len in [10usize, 70_000] {
            let mut wire = frame(&vec![1u8; len]);
            wire.truncate(wire.len() - 1);
            let mut r = &wire[..];
            assert!(matches!(
                read_frame(&mut r, 1 << 20).await,
                Err(FrameError::Truncated)
            ));
        }
        let mut r = &frame(&[0u8; 100])[..];
        assert!(matches!(
            read_frame(&mut r, 99).await,
            Err(FrameError::TooLarge { size: 100, max: 99 })
        ));
        let mut r = &frame(&[0u8; 7])[..];
        assert!(matches!(
            read_frame(&mut r, 99).await,
            Err(FrameError::TooShort(7))
        ));
        let mut r = &[][..];
        assert!(read_frame(&mut r, 99).await.unwrap().is_none());
    }
}
