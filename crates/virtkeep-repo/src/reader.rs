//! Restore side: extents of a disk from its fixed index.

use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};

use crate::error::{RepoError, Result};
use crate::format::{FixedIndex, ZERO_DIGEST};
use crate::repo::Repository;

/// Zero runs at least this long inside data chunks are reported as [`Extent::Zero`].
pub const MIN_ZERO_RUN: usize = 64 << 10;
const BLOCK: usize = 4096;

/// A piece of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extent {
    /// Bytes to write.
    Data { offset: u64, bytes: Bytes },
    /// A run of zeros (write a hole).
    Zero { offset: u64, len: u64 },
}

/// Reads one disk of a backup.
#[derive(Debug, Clone)]
pub struct DiskReader {
    repo: Repository,
    index: Arc<FixedIndex>,
    readahead: usize,
}

impl Repository {
    /// A reader for disk `disk` of backup `id`.
    pub async fn disk_reader(&self, id: &str, disk: &str) -> Result<DiskReader> {
        let index = self.fixed_index(id, disk).await?;
        Ok(DiskReader {
            repo: self.clone(),
            index: Arc::new(index),
            readahead: 4,
        })
    }
}

/// Split decoded chunk data into data extents and zero runs ≥ [`MIN_ZERO_RUN`].
pub fn split_zero_runs(offset: u64, bytes: Bytes) -> Vec<Extent> {
    let mut out = Vec::new();
    let n = bytes.len();
    let mut data_start = 0usize;
    let mut zrun: Option<usize> = None;
    let mut pos = 0usize;
    let emit = |out: &mut Vec<Extent>, data_start: &mut usize, z: usize, end: usize| {
        if end - z >= MIN_ZERO_RUN {
            if *data_start < z {
                out.push(Extent::Data {
                    offset: offset + *data_start as u64,
                    bytes: bytes.slice(*data_start..z),
                });
            }
            out.push(Extent::Zero {
                offset: offset + z as u64,
                len: (end - z) as u64,
            });
            *data_start = end;
        }
    };
    while pos < n {
        let e = (pos + BLOCK).min(n);
        if crate::format::is_all_zero(&bytes[pos..e]) {
            zrun.get_or_insert(pos);
        } else if let Some(z) = zrun.take() {
            emit(&mut out, &mut data_start, z, pos);
        }
        pos = e;
    }
    if let Some(z) = zrun {
        emit(&mut out, &mut data_start, z, n);
    }
    if data_start < n {
        out.push(Extent::Data {
            offset: offset + data_start as u64,
            bytes: bytes.slice(data_start..n),
        });
    }
    out
}

impl DiskReader {
    /// The index.
    pub fn index(&self) -> &FixedIndex {
        &self.index
    }

    /// Disk size.
    pub fn size(&self) -> u64 {
        self.index.size
    }

    /// Set how many chunks `extents()` fetches ahead (default 4).
    pub fn with_readahead(mut self, n: usize) -> Self {
        self.readahead = n.max(1);
        self
    }

    /// Decoded chunk `i` (`None` for an all-zero chunk). Safe to call concurrently.
    pub async fn read_chunk(&self, i: u64) -> Result<Option<Bytes>> {
        let d = *usize::try_from(i)
            .ok()
            .and_then(|i| self.index.digests.get(i))
            .ok_or_else(|| RepoError::InvalidArgument(format!("chunk index {i} out of range")))?;
        if d == ZERO_DIGEST {
            return Ok(None);
        }
        let b = self.repo.read_chunk_by_digest(&d).await?;
        if b.len() as u64 != self.index.chunk_len(i) {
            return Err(RepoError::ChunkCorrupt {
                digest: hex::encode(d),
                reason: format!(
                    "length {} but slot {i} needs {}",
                    b.len(),
                    self.index.chunk_len(i)
                ),
            });
        }
        Ok(Some(b))
    }

    async fn chunk_extents(&self, i: u64) -> Result<Vec<Extent>> {
        let offset = i * self.index.chunk_size;
        Ok(match self.read_chunk(i).await? {
            None => vec![Extent::Zero {
                offset,
                len: self.index.chunk_len(i),
            }],
            Some(b) => split_zero_runs(offset, b),
        })
    }

    /// All extents in order; adjacent zero runs are merged.
    pub fn extents(&self) -> impl Stream<Item = Result<Extent>> + Send + '_ {
        let n = self.index.chunk_count();
        let inner = futures::stream::iter(0..n)
            .map(move |i| self.chunk_extents(i))
            .buffered(self.readahead)
            .map_ok(|v| futures::stream::iter(v.into_iter().map(Ok)))
            .try_flatten()
            .boxed();
        futures::stream::unfold(
            (inner, None::<Extent>, false),
            |(mut inner, mut pend, done)| async move {
                if done {
                    return None;
                }
                loop {
                    match inner.next().await {
                        Some(Ok(Extent::Zero { offset, len })) => {
                            if let Some(Extent::Zero { offset: o, len: l }) = &mut pend
                                && *o + *l == offset
                            {
                                *l += len;
                                continue;
                            }
                            if let Some(p) = pend.replace(Extent::Zero { offset, len }) {
                                return Some((Ok(p), (inner, pend, false)));
                            }
                        }
                        Some(Ok(d)) => {
                            if let Some(p) = pend.replace(d) {
                                return Some((Ok(p), (inner, pend, false)));
                            }
                        }
                        Some(Err(e)) => return Some((Err(e), (inner, None, true))),
                        None => return pend.take().map(|p| (Ok(p), (inner, None, true))),
                    }
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split() {
        let mut v = vec![0u8; 256 << 10];
        v[10] = 1;
        v[200 << 10] = 2;
        let ex = split_zero_runs(1000, Bytes::from(v.clone()));
        // reassemble
        let mut out = vec![0xffu8; v.len()];
        let mut zero_bytes = 0;
        for e in &ex {
            match e {
                Extent::Data { offset, bytes } => {
                    let o = (*offset - 1000) as usize;
                    out[o..o + bytes.len()].copy_from_slice(bytes);
                }
                Extent::Zero { offset, len } => {
                    let o = (*offset - 1000) as usize;
                    out[o..o + *len as usize].fill(0);
                    zero_bytes += len;
                }
            }
        }
        assert_eq!(out, v);
        assert!(zero_bytes >= 128 << 10, "{ex:?}");
    }
}
