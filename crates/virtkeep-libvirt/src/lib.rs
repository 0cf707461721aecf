//! virtkeep-libvirt
