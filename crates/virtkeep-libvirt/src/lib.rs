//! virtkeep-libvirt: the libvirt side of virtkeep, and every command line virtkeep runs
//! on a hypervisor.
//!
//! - [`parse_domain`]: a minimal read model of domain XML ([`Domain`], [`Disk`], …)
//!   with backend classification ([`Disk::backend`]) and default-skip rules
//!   ([`Disk::is_backup_candidate`]).
//! - [`rewrite_domain`]: a byte-preserving rewrite for restore ([`Rewrite`]);
//!   [`isolate_for_boot`]: overlays over NBD, no network, serial to a file ([`Isolation`]).
//! - One module per host tool, each with its builders (returning
//!   `virtkeep_ssh::RemoteCommand`, every argument quoted by `virtkeep_ssh::quote`) beside
//!   the parsers of their output: [`virsh`], [`qemu_img`], [`qemu_nbd`], [`lvm`],
//!   [`rbd`], [`coreutils`] (files, processes, locks) and [`sh`] (constant scripts,
//!   hooks). Nothing here concatenates input into a shell line, and no name can become
//!   an option: names go after `--`, attached to their option (`--image=X`), or as
//!   the value of an option that always takes one (`--domain X`).

mod domain;
mod error;
mod isolate;
mod rewrite;
mod support;
mod xml;

pub mod coreutils;
pub mod lvm;
pub mod qemu_img;
pub mod qemu_nbd;
pub mod rbd;
pub mod sh;
pub mod virsh;

pub use domain::{
    Backend, Disk, DiskAuth, DiskDevice, DiskSource, Domain, Interface, NetHost, RBD_NAME_MAX,
    SkipReason, check_rbd_image, check_rbd_name, lvm_from_path, parse_domain, split_rbd_name,
};
pub use error::{ParseError, XmlError};
pub use isolate::{Isolation, NbdBacking, isolate_for_boot};
pub use rewrite::{
    NewSource, Rewrite, arch_of, disk_element, emulator_of, namespace_uris, rewrite_domain,
};
pub use support::{escape_commas, human_bytes, safe_path};
