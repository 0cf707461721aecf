//! virtkeep-libvirt: the libvirt side of virtkeep.
//!
//! - [`parse_domain`]: a minimal read model of domain XML ([`Domain`], [`Disk`], …)
//!   with backend classification ([`Disk::backend`]) and default-skip rules
//!   ([`Disk::is_backup_candidate`]).
//! - [`rewrite_domain`]: a byte-preserving rewrite for restore ([`Rewrite`]).
//! - [`cmd`]: builders for every hypervisor command line (`virsh`, `qemu-img`,
//!   `qemu-nbd`, LVM, `rbd`, coreutils), returning `virtkeep_ssh::RemoteCommand`.
//! - [`parse`]: parsers for those commands' output.

mod domain;
mod error;
mod rewrite;
mod xml;

pub mod cmd;
pub mod parse;

pub use domain::{
    Backend, Disk, DiskAuth, DiskDevice, DiskSource, Domain, Interface, NetHost, RBD_NAME_MAX,
    SkipReason, check_rbd_image, check_rbd_name, lvm_from_path, parse_domain, split_rbd_name,
};
pub use error::{ParseError, XmlError};
pub use rewrite::{NewSource, Rewrite, rewrite_domain};
