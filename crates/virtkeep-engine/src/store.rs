//! The seam between the data path and the repository's disk writer.

use async_trait::async_trait;
use bytes::Bytes;
use virtkeep_repo::{DiskStats, DiskWriter};

use crate::error::Result;
use crate::export::ChunkSink;

/// Feeds exported chunks into one disk of a backup.
pub struct RepoSink {
    writer: DiskWriter,
}

impl RepoSink {
    pub fn new(writer: DiskWriter) -> Self {
        Self { writer }
    }

    pub async fn finish(&self) -> Result<DiskStats> {
        Ok(self.writer.finish().await?)
    }
}

#[async_trait]
impl ChunkSink for RepoSink {
    fn chunk_size(&self) -> u64 {
        self.writer.chunk_size()
    }

    async fn data_chunk(&self, index: u64, data: Bytes) -> Result<()> {
        self.writer.write_chunk(index, data).await?;
        crate::failpoint::hit("export-chunk-written").await;
        Ok(())
    }

    async fn zero_chunk(&self, index: u64) -> Result<()> {
        Ok(self.writer.zero_chunk(index)?)
    }
}

/// The newest backup of `host`/`vm` in the repository (the parent every incremental
/// method looks for), or `None` when the VM has none.
pub async fn latest_backup(
    repo: &virtkeep_repo::Repository,
    host: &str,
    vm: &str,
) -> Result<Option<virtkeep_repo::Manifest>> {
    let mut snaps = repo.snapshots().await?;
    snaps.retain(|s| s.host == host && s.vm == vm);
    let Some(last) = snaps.into_iter().max_by_key(|s| s.time) else {
        return Ok(None);
    };
    Ok(Some(repo.manifest(&last.id).await?))
}
