//! Output parsers, on output captured from this machine's tools (tests/fixtures/captured)
//! and on the documented JSON shapes where the tool could not run here (LVM).

use virtkeep_libvirt::ParseError;
use virtkeep_libvirt::parse::*;

fn captured(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/captured/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn virsh_list_names() {
    // Captured with another test's hostile domain present.
    let names = parse_virsh_list_names(&captured("virsh-list-names.txt"));
    assert_eq!(
        names,
        [
            "it's $(touch x); \"quoted\" & `bt` ü",
            "vkt-libvirt-fixture-4563"
        ]
    );
    assert!(parse_virsh_list_names("\n").is_empty());
    assert_eq!(parse_virsh_list_names(" a b \r\n\n"), [" a b "]);
    assert_eq!(
        parse_virsh_list_names(&captured("virsh-checkpoint-list.txt")),
        ["vk-1"]
    );
}

#[test]
fn domstate() {
    assert_eq!(
        parse_domstate(&captured("virsh-domstate-running.txt")).expect("parse"),
        DomainState::Running
    );
    let off = parse_domstate(&captured("virsh-domstate-shutoff.txt")).expect("parse");
    assert_eq!(off, DomainState::ShutOff);
    assert!(!off.is_active());
    assert_eq!(
        parse_domstate("blocked\n").expect("parse"),
        DomainState::Other("blocked".into())
    );
    assert!(parse_domstate("\n\n").is_err());
}

#[test]
fn virsh_version() {
    let v = parse_virsh_version(&captured("virsh-version.txt")).expect("parse");
    assert_eq!(v.compiled_library, Some(Version::new(9, 0, 0)));
    assert_eq!(v.library, Some(Version::new(9, 0, 0)));
    assert_eq!(v.api, Some(("QEMU".into(), Version::new(9, 0, 0))));
    assert_eq!(v.hypervisor, Some(("QEMU".into(), Version::new(7, 2, 22))));
    assert_eq!(v.daemon, Some(Version::new(9, 0, 0)));
    assert!(v.daemon.expect("daemon") >= Version::new(7, 2, 0));
    // Xen without a hypervisor line.
    let x = parse_virsh_version(
        "Compiled against library: libvirt 7.0.0\nUsing library: libvirt 7.0.0\nUsing API: Xen 7.0.0\nRunning hypervisor: Xen 4.14.0\n",
    )
    .expect("xen");
    assert_eq!(x.hypervisor, Some(("Xen".into(), Version::new(4, 14, 0))));
    assert!(parse_virsh_version("error: failed to connect").is_err());
    assert_eq!(Version::parse("10.0.2"), Some(Version::new(10, 0, 2)));
    assert_eq!(Version::parse("7.2"), Some(Version::new(7, 2, 0)));
    assert_eq!(Version::parse("x"), None);
    assert_eq!(Version::new(9, 0, 0).to_string(), "9.0.0");
}

#[test]
fn domcapabilities_backup() {
    assert!(
        parse_domcapabilities_backup_supported(&captured("domcapabilities.xml")).expect("parse")
    );
    assert!(
        !parse_domcapabilities_backup_supported(
            "<domainCapabilities><features><backup supported='no'/></features></domainCapabilities>"
        )
        .expect("parse")
    );
    assert!(
        !parse_domcapabilities_backup_supported(
            "<domainCapabilities><features/></domainCapabilities>"
        )
        .expect("parse")
    );
    assert!(matches!(
        parse_domcapabilities_backup_supported("<domainCapabilities><features>"),
        Err(ParseError::Xml { .. })
    ));
    assert!(parse_domcapabilities_backup_supported("<capabilities/>").is_err());
}

#[test]
fn qemu_img_info() {
    let i = parse_qemu_img_info(&captured("qemu-img-info-bitmap.json")).expect("parse");
    assert_eq!(i.format, "qcow2");
    assert_eq!(i.virtual_size, 64 << 20);
    assert!(i.actual_size.is_some());
    assert_eq!(i.cluster_size, Some(65536));
    assert_eq!(i.backing_filename, None);
    let names: Vec<&str> = i.dirty_bitmaps.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["vk-1", "vk-2"]);
    assert!(i.dirty_bitmaps[0].flags.is_empty());
    assert_eq!(i.dirty_bitmaps[1].flags, ["auto"]);
    assert_eq!(i.dirty_bitmaps[1].granularity, 65536);
    assert!(!i.dirty_bitmaps[1].is_inconsistent());

    let o = parse_qemu_img_info(&captured("qemu-img-info-overlay.json")).expect("parse");
    assert!(
        o.backing_filename
            .as_deref()
            .is_some_and(|b| b.ends_with("/disk0.qcow2"))
    );
    assert_eq!(o.backing_format.as_deref(), Some("qcow2"));
    assert!(o.full_backing_filename.is_some());

    let r = parse_qemu_img_info(&captured("qemu-img-info-raw.json")).expect("parse");
    assert_eq!(r.format, "raw");
    assert_eq!(r.virtual_size, 16 << 20);
    assert!(r.dirty_bitmaps.is_empty());

    // --backing-chain gives an array: the top image is returned.
    let chain = format!(
        "[{},{}]",
        captured("qemu-img-info-overlay.json"),
        captured("qemu-img-info-bitmap.json")
    );
    assert_eq!(parse_qemu_img_info(&chain).expect("chain"), o);
    assert!(matches!(
        parse_qemu_img_info("qemu-img: Could not open 'x'"),
        Err(ParseError::Json { .. })
    ));
    assert!(parse_qemu_img_info("[]").is_err());
}

#[test]
fn qemu_img_map() {
    let m = parse_qemu_img_map(&captured("qemu-img-map.json")).expect("parse");
    assert_eq!(m.len(), 3);
    assert!(m[1].data && !m[1].zero);
    assert_eq!((m[1].start, m[1].length), (1 << 20, 1 << 20));
    assert_eq!(m.iter().map(|e| e.length).sum::<u64>(), 64 << 20);
}

const LVS: &str = r#"  {
      "report": [
          {
              "lv": [
                  {"lv_name":"root", "vg_name":"vg0", "lv_size":"8589934592", "lv_attr":"-wi-ao----", "pool_lv":"", "origin":"", "data_percent":"", "lv_path":"/dev/vg0/root"},
                  {"lv_name":"root.vk-1", "vg_name":"vg0", "lv_size":"1073741824", "lv_attr":"swi-a-s---", "pool_lv":"", "origin":"root", "data_percent":"0.01", "lv_path":"/dev/vg0/root.vk-1"},
                  {"lv_name":"pool0", "vg_name":"vg-data", "lv_size":"21474836480", "lv_attr":"twi-aotz--", "pool_lv":"", "origin":"", "data_percent":"12.50", "lv_path":""},
                  {"lv_name":"thin1", "vg_name":"vg-data", "lv_size":"10737418240", "lv_attr":"Vwi-aotz--", "pool_lv":"pool0", "origin":"", "data_percent":"25.00", "lv_path":"/dev/vg-data/thin1"},
                  {"lv_name":"thin1.vk-1", "vg_name":"vg-data", "lv_size":"10737418240", "lv_attr":"Vwi---tz-k", "pool_lv":"pool0", "origin":"thin1", "data_percent":"", "lv_path":"/dev/vg-data/thin1.vk-1"}
              ]
          }
      ]
  }
"#;

#[test]
fn lvs_json() {
    let lvs = parse_lvs_json(LVS).expect("parse");
    assert_eq!(lvs.len(), 5);
    let root = &lvs[0];
    assert_eq!(
        (root.name.as_str(), root.vg.as_str(), root.size),
        ("root", "vg0", 8 << 30)
    );
    assert!(root.is_open() && root.is_active() && !root.is_snapshot());
    assert_eq!(root.path.as_deref(), Some("/dev/vg0/root"));
    assert_eq!(root.data_percent, None);
    let snap = &lvs[1];
    assert!(snap.is_snapshot());
    assert_eq!(snap.origin.as_deref(), Some("root"));
    assert_eq!(snap.data_percent, Some(0.01));
    assert!(lvs[2].is_thin_pool());
    assert_eq!(lvs[2].path, None);
    assert!(lvs[3].is_thin() && !lvs[3].is_snapshot());
    assert_eq!(lvs[3].pool_lv.as_deref(), Some("pool0"));
    assert!(lvs[4].is_snapshot() && !lvs[4].is_active());
    // Captured on this machine (no VGs).
    assert!(
        parse_lvs_json(&captured("lvs-empty.json"))
            .expect("empty")
            .is_empty()
    );
    assert!(
        parse_lvs_json(r#"{"report":[{"lv":[{"lv_name":"a","vg_name":"b","lv_size":"12.5g"}]}]}"#)
            .is_err()
    );
    assert!(parse_lvs_json("  WARNING: Running as a non-root user.").is_err());
    let tagged = parse_lvs_json(
        r#"{"report":[{"lv":[{"lv_name":"a","vg_name":"b","lv_size":"1","lv_tags":"virtkeep_base,other"}]}]}"#,
    )
    .expect("tags");
    assert_eq!(tagged[0].tags, vec!["virtkeep_base", "other"]);
    assert!(lvs[0].tags.is_empty());
}

#[test]
fn vgs_json() {
    let j = r#"  {
      "report": [
          {
              "vg": [
                  {"vg_name":"vg0", "vg_size":"53682896896", "vg_free":"10733223936", "vg_extent_size":"4194304"},
                  {"vg_name":"vg-data", "vg_size":"107369988096", "vg_free":"0", "vg_extent_size":"4194304"}
              ]
          }
      ]
  }
"#;
    let vgs = parse_vgs_json(j).expect("parse");
    assert_eq!(
        vgs[0],
        VgInfo {
            name: "vg0".into(),
            size: 53_682_896_896,
            free: 10_733_223_936,
            extent_size: 4_194_304
        }
    );
    assert_eq!(vgs[1].free, 0);
    assert!(parse_vgs_json(r#"{"report":[{"vg":[{"vg_name":"x"}]}]}"#).is_err());
}

#[test]
fn rbd_info_and_snaps() {
    // Captured from the lab's Ceph 16 cluster (`rbd create --size 5242881B`).
    let i = parse_rbd_info_json(&captured("rbd-info.json")).expect("parse");
    assert_eq!(i.size, 5_242_881);
    assert_eq!(i.object_size, 4 << 20);
    assert_eq!(i.order, 22);
    assert_eq!(i.format, 2);
    assert!(i.has_fast_diff());
    assert_eq!(i.parent, None);
    let clone = r#"{"name":"c","id":"ab","size":1024,"objects":1,"order":22,"object_size":4194304,
        "snapshot_count":0,"block_name_prefix":"rbd_data.ab","format":2,"features":["layering"],
        "op_features":[],"flags":[],"parent":{"pool":"rbd","pool_namespace":"","image":"base","id":"aa","snapshot":"gold","trash":false,"overlap":1024}}"#;
    let c = parse_rbd_info_json(clone).expect("clone");
    assert_eq!(c.parent.expect("parent").snapshot, "gold");
    assert!(!c.features.is_empty());

    let snaps = parse_rbd_snap_ls_json(&captured("rbd-snap-ls.json")).expect("parse");
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[0].name, "vk-1");
    assert_eq!(snaps[1].name, "vk-2");
    assert!(!snaps[0].protected);
    assert_eq!(snaps[0].size, 5_242_881);
    assert!(snaps[0].timestamp.is_some());
    assert!(parse_rbd_snap_ls_json("[]").expect("empty").is_empty());
    assert!(
        parse_rbd_snap_ls_json(r#"[{"id":1,"name":"p","size":1,"protected":"true"}]"#).expect("p")
            [0]
        .protected
    );
    assert!(
        parse_rbd_info_json("rbd: error opening image x: (2) No such file or directory").is_err()
    );
}

#[test]
fn df_and_stat() {
    assert!(parse_df_avail(&captured("df-avail.txt")).expect("df") > 0);
    assert_eq!(parse_df_avail("  Avail\n12345\n").expect("df"), 12345);
    assert!(parse_df_avail("  Avail\n").is_err());
    assert!(parse_df_avail("Avail\n-\n").is_err());
    let s = parse_stat("16777216\troot\troot\t644\tregular file\n").expect("stat");
    assert_eq!(s.size, 16_777_216);
    assert_eq!(s.mode, 0o644);
    assert_eq!(s.user, "root");
    assert!(parse_stat("garbage").is_err());
}
