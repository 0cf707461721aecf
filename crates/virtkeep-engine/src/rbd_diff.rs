//! The `rbd export-diff` stream format (v1), read and written on the node.
//!
//! ```text
//! "rbd diff v1\n"
//! 'f' u32 len, name      from-snapshot (incrementals)
//! 't' u32 len, name      to-snapshot
//! 's' u64 size           image size at the end snapshot
//! 'w' u64 offset, u64 length, data
//! 'z' u64 offset, u64 length   (zeroed / discarded)
//! 'e'                    end
//! ```
//! All integers little-endian. Records come in ascending offset order.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const HEADER: &[u8] = b"rbd diff v1\n";

/// One record of interest to the backup.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    Size(u64),
    Data { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    End,
}

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("reading the rbd diff stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("not an rbd diff v1 stream")]
    BadHeader,
    #[error("unknown record tag {0:#04x} in the rbd diff stream")]
    UnknownTag(u8),
    #[error("rbd diff record of {0} bytes exceeds the limit")]
    TooLarge(u64),
}

/// Longest data record accepted in one piece; rbd writes at most an object (4 MiB by
/// default, at most 32 MiB) per record.
const MAX_RECORD: u64 = 64 << 20;

pub struct DiffReader<R> {
    inner: R,
}

impl<R: AsyncRead + Unpin> DiffReader<R> {
    pub async fn new(mut inner: R) -> Result<Self, DiffError> {
        let mut header = [0u8; 12];
        inner.read_exact(&mut header).await?;
        if header != HEADER {
            return Err(DiffError::BadHeader);
        }
        Ok(DiffReader { inner })
    }

    pub async fn next(&mut self) -> Result<Record, DiffError> {
        loop {
            let tag = self.inner.read_u8().await?;
            match tag {
                b'f' | b't' => {
                    let len = u64::from(self.inner.read_u32_le().await?);
                    if len > 4096 {
                        return Err(DiffError::TooLarge(len));
                    }
                    let mut name = vec![0u8; len as usize];
                    self.inner.read_exact(&mut name).await?;
                }
                b's' => return Ok(Record::Size(self.inner.read_u64_le().await?)),
                b'w' => {
                    let offset = self.inner.read_u64_le().await?;
                    let len = self.inner.read_u64_le().await?;
                    if len > MAX_RECORD {
                        return Err(DiffError::TooLarge(len));
                    }
                    let mut data = vec![0u8; len as usize];
                    self.inner.read_exact(&mut data).await?;
                    return Ok(Record::Data { offset, data });
                }
                b'z' => {
                    let offset = self.inner.read_u64_le().await?;
                    let len = self.inner.read_u64_le().await?;
                    return Ok(Record::Zero { offset, len });
                }
                b'e' => return Ok(Record::End),
                other => return Err(DiffError::UnknownTag(other)),
            }
        }
    }
}

/// Writes a diff stream that `rbd import-diff` applies to a fresh image.
pub struct DiffWriter<W> {
    inner: W,
}

impl<W: AsyncWrite + Unpin> DiffWriter<W> {
    pub async fn new(mut inner: W, size: u64) -> std::io::Result<Self> {
        inner.write_all(HEADER).await?;
        inner.write_u8(b's').await?;
        inner.write_u64_le(size).await?;
        Ok(DiffWriter { inner })
    }

    pub async fn data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_u8(b'w').await?;
        self.inner.write_u64_le(offset).await?;
        self.inner.write_u64_le(data.len() as u64).await?;
        self.inner.write_all(data).await
    }

    pub async fn finish(mut self) -> std::io::Result<W> {
        self.inner.write_u8(b'e').await?;
        self.inner.flush().await?;
        Ok(self.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip() {
        let mut w = DiffWriter::new(Vec::new(), 1 << 20).await.expect("w");
        w.data(4096, b"hello").await.expect("data");
        let mut bytes = w.finish().await.expect("finish");
        // An incremental's extra records: from/to names and a zero run.
        bytes.truncate(bytes.len() - 1);
        bytes.push(b'z');
        bytes.extend_from_slice(&8192u64.to_le_bytes());
        bytes.extend_from_slice(&4096u64.to_le_bytes());
        bytes.push(b't');
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(b"snp");
        bytes.push(b'e');
        let mut r = DiffReader::new(&bytes[..]).await.expect("r");
        assert_eq!(r.next().await.expect("s"), Record::Size(1 << 20));
        assert_eq!(
            r.next().await.expect("w"),
            Record::Data {
                offset: 4096,
                data: b"hello".to_vec()
            }
        );
        assert_eq!(
            r.next().await.expect("z"),
            Record::Zero {
                offset: 8192,
                len: 4096
            }
        );
        assert_eq!(r.next().await.expect("e"), Record::End);
    }

    #[tokio::test]
    async fn hostile_streams_are_refused() {
        assert!(matches!(
            DiffReader::new(&b"rbd diff v2\n"[..]).await,
            Err(DiffError::BadHeader)
        ));
        let mut bytes = HEADER.to_vec();
        bytes.push(b'w');
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        let mut r = DiffReader::new(&bytes[..]).await.expect("r");
        assert!(matches!(r.next().await, Err(DiffError::TooLarge(_))));
        let unknown = [HEADER, b"?"].concat();
        let mut r = DiffReader::new(&unknown[..]).await.expect("r");
        assert!(matches!(r.next().await, Err(DiffError::UnknownTag(b'?'))));
    }
}
