//! Transitional: the parsers under their old paths, while code outside this crate
//! moves to the per-tool modules. To be removed.

pub use crate::coreutils::{StatInfo, parse_df_avail, parse_stat};
pub use crate::lvm::{LvInfo, VgInfo, parse_lvs_json, parse_vgs_json};
pub use crate::qemu_img::{
    DirtyBitmap, ImageInfo, MapExtent, parse_qemu_img_info, parse_qemu_img_map,
};
pub use crate::rbd::{
    RbdImageInfo, RbdParent, RbdSnap, parse_rbd_info_json, parse_rbd_snap_ls_json,
};
pub use crate::virsh::{
    DomainState, Version, VirshVersion, parse_domcapabilities_backup_supported, parse_domstate,
    parse_virsh_list_names, parse_virsh_version,
};
