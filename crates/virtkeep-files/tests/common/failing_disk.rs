//! A test disk shared by the ext4 and NTFS tests.

use std::io::Cursor;

/// A disk that fails (`io::ErrorKind::Other`, as the repository's disk view does on an
/// outage or a missing chunk) for reads starting in `bad`.
pub struct FailingDisk {
    pub inner: Cursor<Vec<u8>>,
    pub bad: std::ops::Range<u64>,
}

impl std::io::Read for FailingDisk {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.bad.contains(&self.inner.position()) {
            return Err(std::io::Error::other(
                "chunk 0123abcd failed authentication",
            ));
        }
        self.inner.read(buf)
    }
}

impl std::io::Seek for FailingDisk {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}
