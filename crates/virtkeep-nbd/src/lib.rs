//! virtkeep-nbd: an async NBD client (fixed newstyle handshake, structured replies,
//! metadata contexts, pipelined requests) over any tokio byte stream — in virtkeep a
//! unix socket forwarded through SSH to `qemu-nbd` on the hypervisor — and a read-only
//! NBD server ([`NbdServer`]) that exports backups to qemu-img and other NBD clients.
//!
//! ```no_run
//! # async fn f(stream: tokio::net::UnixStream) -> Result<(), virtkeep_nbd::NbdError> {
//! use virtkeep_nbd::{NbdClient, BASE_ALLOCATION, MappedKind, allocated_extents};
//! let nbd = NbdClient::connect(stream, "", &[BASE_ALLOCATION]).await?;
//! for m in allocated_extents(&nbd, BASE_ALLOCATION, 0, nbd.size()).await? {
//!     if m.kind == MappedKind::Data {
//!         let _bytes = nbd.read(m.offset, m.length.min(u64::from(nbd.max_block())) as u32).await?;
//!     }
//! }
//! nbd.disconnect().await?;
//! # Ok(()) }
//! ```

mod client;
mod error;
mod handshake;
mod proto;
mod server;

pub use client::NbdClient;
pub use error::NbdError;
pub use proto::errno_name;
pub use server::{
    ExportSource, MAX_CONNECTIONS, MAX_OPTIONS, NbdServer, serve_listener, serve_unix,
};

/// The standard allocation metadata context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is not allocated (reads as zero or backing data).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the extent reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flag: the extent is dirty (changed since the bitmap started).
pub const DIRTY: u32 = 1;
/// Prefix of QEMU's dirty-bitmap contexts (`qemu:dirty-bitmap:NAME`).
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// One block-status extent, with an absolute offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

/// Block size constraints advertised with NBD_INFO_BLOCK_SIZE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// What the backup engine has to do with a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappedKind {
    /// Must be read (allocated data, or dirty in a bitmap context).
    Data,
    /// Reads as zeros (`base:allocation` with STATE_ZERO).
    Zero,
    /// Clean in a dirty-bitmap context: same as the previous backup.
    Unchanged,
}

/// A merged range of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapped {
    pub offset: u64,
    pub length: u64,
    pub kind: MappedKind,
}

/// Classifies an extent of `context`: for `base:allocation`, ZERO (with or without
/// HOLE) is `Zero` and anything else `Data`; for every other context (dirty bitmaps)
/// bit 0 (DIRTY) is `Data` and its absence `Unchanged`.
pub fn classify(context: &str, flags: u32) -> MappedKind {
    if context == BASE_ALLOCATION {
        if flags & STATE_ZERO != 0 {
            MappedKind::Zero
        } else {
            MappedKind::Data
        }
    } else if flags & DIRTY != 0 {
        MappedKind::Data
    } else {
        MappedKind::Unchanged
    }
}

/// Block status over `offset..offset+len` in `context`, classified (see [`classify`])
/// and with adjacent ranges of the same kind merged. The result covers the range.
pub async fn allocated_extents(
    client: &NbdClient,
    context: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<Mapped>, NbdError> {
    let extents = client.block_status_all(context, offset, len).await?;
    Ok(merge(context, &extents))
}

fn merge(context: &str, extents: &[Extent]) -> Vec<Mapped> {
    let mut out: Vec<Mapped> = Vec::new();
    for e in extents {
        let kind = classify(context, e.flags);
        match out.last_mut() {
            Some(m) if m.kind == kind && m.offset + m.length == e.offset => m.length += e.length,
            _ => out.push(Mapped {
                offset: e.offset,
                length: e.length,
                kind,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_classifies_and_joins() {
        let ex = [
            Extent {
                offset: 0,
                length: 10,
                flags: 0,
            },
            Extent {
                offset: 10,
                length: 5,
                flags: 0,
            },
            Extent {
                offset: 15,
                length: 5,
                flags: STATE_ZERO | STATE_HOLE,
            },
            Extent {
                offset: 20,
                length: 5,
                flags: STATE_ZERO,
            },
            Extent {
                offset: 25,
                length: 5,
                flags: STATE_HOLE,
            },
        ];
        let m = merge(BASE_ALLOCATION, &ex);
        assert_eq!(
            m,
            vec![
                Mapped {
                    offset: 0,
                    length: 15,
                    kind: MappedKind::Data
                },
                Mapped {
                    offset: 15,
                    length: 10,
                    kind: MappedKind::Zero
                },
                Mapped {
                    offset: 25,
                    length: 5,
                    kind: MappedKind::Data
                },
            ]
        );
        let d = merge("qemu:dirty-bitmap:b", &ex);
        assert_eq!(d[0].kind, MappedKind::Unchanged);
        assert_eq!(d.last().map(|m| m.kind), Some(MappedKind::Data));
    }
}
