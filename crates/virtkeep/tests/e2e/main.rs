//! End-to-end tests of the virtkeep binary against the real lab: a private sshd standing
//! for the hypervisor, the machine's libvirtd + QEMU (TCG) and qemu-nbd.
//! One test binary with a shared harness (ripgrep style).

mod harness;

mod api;
mod auth;
mod backup_restore;
mod boot_verify;
mod cleanup_verify;
mod cli;
mod cluster;
mod completions;
mod config;
mod daemon;
mod failures;
mod faults;
mod files;
mod files_api;
mod files_fs;
mod hardening;
mod hosts;
mod incremental;
mod keys;
mod live;
mod live_detach;
mod live_restore;
mod lvm_host;
mod memory;
mod object_lock;
mod quickstart;
mod rbd;
mod repository;
mod restore_define;
mod restore_safety;
mod restore_space;
mod sync;
mod uefi;
mod web;
