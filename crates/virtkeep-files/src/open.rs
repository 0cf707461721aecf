//! Which reader opens a filesystem: the one place that knows every implementation of
//! [`GuestFs`] (the readers themselves only know `fs`, so no reader imports another).

use std::io::{Read, Seek};

use crate::error::FilesError;
use crate::fs::GuestFs;
use crate::fsdetect::FsInfo;

/// The filesystem types read here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext,
    Fat,
    Ntfs,
    Xfs,
}

impl FsType {
    /// The readable type of a recognised signature, if any.
    pub fn of(info: &FsInfo) -> Option<FsType> {
        match info.kind.as_str() {
            "ext2" | "ext3" | "ext4" => Some(FsType::Ext),
            "vfat" => Some(FsType::Fat),
            "ntfs" => Some(FsType::Ntfs),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }
}

/// Opens the filesystem of type `t` spanning all `len` bytes of `r`.
pub fn open_fs<R: Read + Seek + 'static>(
    t: FsType,
    r: R,
    len: u64,
) -> Result<Box<dyn GuestFs>, FilesError> {
    match t {
        FsType::Ext => Ok(Box::new(crate::ext4::ExtFs::open(r, 0, len)?)),
        FsType::Fat => Ok(Box::new(crate::fat::FatFs::open(r, len)?)),
        FsType::Ntfs => Ok(Box::new(crate::ntfs::NtfsFs::open(r, len)?)),
        FsType::Xfs => Ok(Box::new(crate::xfs::XfsFs::open(r, len)?)),
    }
}
