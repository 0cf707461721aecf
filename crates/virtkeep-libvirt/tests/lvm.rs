//! LVM builders and parsers (on the documented JSON shapes; LVM cannot run here).

use virtkeep_libvirt::lvm::{self, *};

fn captured(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/captured/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn lvm() {
    let env = "LC_ALL=C LVM_SUPPRESS_FD_WARNINGS=1";
    assert_eq!(
        lvm::lvs_json(None).render(),
        format!(
            "{env} lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_size,lv_attr,pool_lv,origin,data_percent,lv_path,lv_tags,lv_uuid"
        )
    );
    assert_eq!(
        lvm::lvs_json(Some("vg0")).render(),
        format!(
            "{env} lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_size,lv_attr,pool_lv,origin,data_percent,lv_path,lv_tags,lv_uuid -- vg0"
        )
    );
    assert_eq!(
        lvm::vgs_json().render(),
        format!(
            "{env} vgs --reportformat json --units b --nosuffix -o vg_name,vg_size,vg_free,vg_extent_size"
        )
    );
    assert_eq!(lvm::version().render(), format!("{env} lvm version"));
    assert_eq!(
        lvm::lvcreate_snapshot("vg0", "root", "root.vk-1", Some(1 << 30)).render(),
        format!("{env} lvcreate -s '--name=root.vk-1' '--size=1073741824b' -- vg0/root")
    );
    assert_eq!(
        lvm::lvcreate_snapshot("vg0", "thin1", "thin1.vk-1", None).render(),
        format!("{env} lvcreate -s '--name=thin1.vk-1' -kn -- vg0/thin1")
    );
    assert_eq!(
        lvm::lvremove("vg0", "root.vk-1").render(),
        format!("{env} lvremove -f -- vg0/root.vk-1")
    );
    assert_eq!(
        lvm::lvcreate("vg0", "restored", 16 << 20).render(),
        format!("{env} lvcreate --yes -Wy -Zy '--name=restored' '--size=16777216b' -- vg0")
    );
    assert_eq!(
        lvm::lvcreate_thin("vg0", "restored", 16 << 20, "pool0").render(),
        format!(
            "{env} lvcreate --yes '--name=restored' '--virtualsize=16777216b' '--thinpool=pool0' -- vg0"
        )
    );
    assert_eq!(
        lvm::lvrename("vg0", "a", "b").render(),
        format!("{env} lvrename -- vg0 a b")
    );
    assert_eq!(
        lvm::set_base_tag("vg0", "s", true).render(),
        format!("{env} lvchange --addtag virtkeep_base -- vg0/s")
    );
    assert_eq!(
        lvm::set_base_tag("vg0", "s", false).render(),
        format!("{env} lvchange --deltag virtkeep_base -- vg0/s")
    );
    let td = lvm::thin_delta("vg-0", "pool", "a", "b").render();
    assert!(td.starts_with(&format!("{env} sh -c 'set -e")), "{td}");
    assert!(td.ends_with("' sh vg-0 pool a b"), "{td}");
}

/// Names that look like options stay operands or values: after `--`, or attached.
#[test]
fn lvm_names_are_never_options() {
    let (vg, lv, name) = ("-vg", "-lv", "-n");
    let lines = [
        lvm::lvs_json(Some(vg)),
        lvm::lvcreate_snapshot(vg, lv, name, Some(1)),
        lvm::lvcreate_snapshot(vg, lv, name, None),
        lvm::lvremove(vg, lv),
        lvm::lvcreate(vg, name, 1),
        lvm::lvcreate_thin(vg, name, 1, "-p"),
        lvm::lvrename(vg, lv, name),
        lvm::set_base_tag(vg, lv, true),
    ];
    for c in lines {
        let line = c.render();
        let words: Vec<&str> = line.split(' ').collect();
        let dashdash = words.iter().position(|w| *w == "--");
        for (i, w) in words.iter().enumerate() {
            let w = w.trim_matches('\'');
            let named = w.starts_with("-vg") || w.starts_with("-lv") || w == "-n" || w == "-p";
            assert!(
                !named || dashdash.is_some_and(|d| i > d),
                "{w:?} reaches LVM as an option in {line}"
            );
        }
    }
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

/// This machine's LVM parses every builder's line (it has no device-mapper, so nothing
/// is created: each line fails after option parsing, on the missing VG or the kernel).
/// Names that start with `-` stay operands. Skipped without LVM.
#[test]
fn lvm_forms_parse_with_this_machines_lvm() {
    let run = |c: &virtkeep_ssh::RemoteCommand| {
        std::process::Command::new("sh")
            .args(["-c", &c.render()])
            .output()
            .expect("sh")
    };
    if !run(&lvm::version()).status.success() {
        return;
    }
    for vg in ["vkt-no-such-vg", "-vkt-no-such-vg"] {
        let lines = [
            lvm::lvs_json(Some(vg)),
            lvm::lvcreate_snapshot(vg, "-lv", "-snap", Some(4 << 20)),
            lvm::lvcreate_snapshot(vg, "lv", "snap", None),
            lvm::lvremove(vg, "-lv"),
            lvm::lvcreate(vg, "-new", 4 << 20),
            lvm::lvcreate_thin(vg, "new", 4 << 20, "-pool"),
            lvm::lvrename(vg, "-a", "b"),
            lvm::set_base_tag(vg, "-s", true),
        ];
        for c in lines {
            let out = run(&c);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !err.contains("nrecognized option")
                    && !err.contains("Error during parsing")
                    && !err.contains("Invalid argument for"),
                "{}: {err}",
                c.render()
            );
            if c.render().contains(" lvs ") {
                continue;
            }
            assert!(!out.status.success(), "{}", c.render());
        }
    }
}
