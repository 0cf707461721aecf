//! Transitional: the builders under their old paths, while code outside this crate
//! moves to the per-tool modules. To be removed.

pub use crate::coreutils::{
    FLOCK_CONFLICT_STATUS, STAT_FORMAT, chown, df_avail, mkdir_p, rm_f, stat,
};
pub use crate::lvm::lvcreate_snapshot;
pub use crate::lvm::{LVS_FIELDS, VGS_FIELDS, lvcreate, lvremove, lvs_json, vgs_json};
pub use crate::qemu_img::{
    commit as qemu_img_commit, create_overlay as qemu_img_create_overlay,
    create_qcow2 as qemu_img_create_qcow2, create_raw as qemu_img_create_raw,
    info_json as qemu_img_info_json, map_json as qemu_img_map_json,
};
pub use crate::qemu_nbd::{
    export_readonly as qemu_nbd_export_readonly, export_writable as qemu_nbd_export_writable,
    image_opts,
};
pub use crate::rbd::{CephArgs, rbd_image_arg};
pub use crate::support::{escape_commas, safe_path};
pub use crate::virsh::{UndefineOptions, Virsh};
