//! `rbd` builders (exactly as the remote shell gets them; run against Ceph 16) and
//! parsers (on captured output).

use virtkeep_libvirt::rbd::*;

fn captured(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/captured/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn rbd_passes_ceph_settings_every_time() {
    let c = CephArgs {
        conf: Some("/etc/ceph/c 1.conf".into()),
        id: Some("backup".into()),
        keyring: Some("/etc/ceph/ceph.client.backup.keyring".into()),
    };
    let pre =
        "rbd -c '/etc/ceph/c 1.conf' --id backup --keyring /etc/ceph/ceph.client.backup.keyring";
    assert_eq!(
        c.info_json("vms", "db").render(),
        format!("{pre} info --format json '--image=vms/db'")
    );
    assert_eq!(
        c.snap_create("vms", "db", "vk-1").render(),
        format!("{pre} snap create --no-progress '--image=vms/db@vk-1'")
    );
    assert_eq!(
        c.snap_rm("vms", "db", "vk-1").render(),
        format!("{pre} snap rm --no-progress '--image=vms/db@vk-1'")
    );
    assert_eq!(
        c.snap_ls_json("vms", "db").render(),
        format!("{pre} snap ls --format json '--image=vms/db'")
    );
    assert_eq!(
        c.export_diff("vms", "db", "vk-2", Some("vk-1")).render(),
        format!("{pre} export-diff --no-progress '--from-snap=vk-1' '--image=vms/db@vk-2' -")
    );
    assert_eq!(
        c.export_diff("vms", "db", "vk-1", None).render(),
        format!("{pre} export-diff --no-progress '--image=vms/db@vk-1' -")
    );
    assert_eq!(
        c.import_diff("vms", "db").render(),
        format!("{pre} import-diff --no-progress - '--image=vms/db'")
    );
    assert_eq!(
        c.create("vms", "db", 5_242_881).render(),
        format!("{pre} create '--size=5242881B' '--image=vms/db'")
    );
    assert_eq!(
        c.rm("vms", "db").render(),
        format!("{pre} rm --no-progress '--image=vms/db'")
    );
    assert_eq!(
        CephArgs::default().info_json("p", "i").render(),
        "rbd info --format json '--image=p/i'"
    );
}

/// Pool, image and snapshot names that look like options stay values: every rbd
/// builder passes them attached to `'--image=`' (and `'--from-snap=`),' never as a word of
/// their own.
#[test]
fn rbd_names_are_never_options() {
    let c = CephArgs::default();
    let (pool, image, snap) = ("--keyring=/tmp/evil", "-x", "--pool=other");
    let cmds = [
        c.info_json(pool, image),
        c.snap_create(pool, image, snap),
        c.snap_rm(pool, image, snap),
        c.snap_ls_json(pool, image),
        c.export_diff(pool, image, snap, Some(snap)),
        c.import_diff(pool, image),
        c.create(pool, image, 1),
        c.rm(pool, image),
        c.meta_get(pool, image, "virtkeep.base"),
        c.meta_set(pool, image, "virtkeep.base", "virtkeep-1"),
        c.meta_remove(pool, image, "virtkeep.base"),
        c.snap_purge(pool, image),
        c.rename(pool, image, snap),
    ];
    let allowed = [
        "--format",
        "--no-progress",
        "--image=--keyring=/tmp/evil/-x",
        "--image=--keyring=/tmp/evil/-x@--pool=other",
        "--from-snap=--pool=other",
        "--size=1B",
        "--dest=--keyring=/tmp/evil/--pool=other",
    ];
    for cmd in cmds {
        let line = cmd.render();
        for word in line.split(' ').filter(|w| w.starts_with('-')) {
            let word = word.trim_matches('\'');
            assert!(
                word == "-" || allowed.contains(&word),
                "{word:?} reaches rbd as an option of its own in {line}"
            );
        }
    }
    assert_eq!(
        c.meta_set("rbd", "ns/img", "virtkeep.base", "virtkeep-1")
            .render(),
        "rbd image-meta set '--image=rbd/ns/img' virtkeep.base virtkeep-1"
    );
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
fn rbd_pool_stats_snap_purge_rename() {
    let c = CephArgs {
        conf: Some("/c".into()),
        id: None,
        keyring: None,
    };
    assert_eq!(c.default_pool_stats().render(), "rbd -c /c pool stats");
    assert_eq!(
        c.snap_purge("vms", "db").render(),
        "rbd -c /c snap purge --no-progress '--image=vms/db'"
    );
    assert_eq!(
        c.rename("vms", "db.tmp", "db").render(),
        "rbd -c /c rename '--image=vms/db.tmp' '--dest=vms/db'"
    );
}

/// Every rbd builder against the lab's Ceph cluster (skipped when the lab is not up;
/// it makes and removes one `vkt-` image of its own).
#[test]
fn rbd_forms_run_against_the_lab_cluster() {
    let Some(lab) = virtkeep_lab::Lab::load().filter(virtkeep_lab::Lab::healthy) else {
        return;
    };
    let c = CephArgs {
        conf: Some(lab.ceph_conf.to_string_lossy().into_owned()),
        id: Some(lab.ceph_id.clone()),
        keyring: Some(lab.ceph_keyring.to_string_lossy().into_owned()),
    };
    let run = |cmd: &virtkeep_ssh::RemoteCommand| {
        let out = std::process::Command::new("sh")
            .args(["-c", &cmd.render()])
            .output()
            .expect("sh");
        assert!(out.status.success(), "{}: {out:?}", cmd.render());
        String::from_utf8(out.stdout).expect("utf8")
    };
    let pool = lab.ceph_pool.as_str();
    let a = format!("vkt-libvirt-rbd-{}", std::process::id());
    let b = format!("{a}-renamed");
    run(&c.default_pool_stats());
    run(&c.create(pool, &a, 1 << 20));
    let info = parse_rbd_info_json(&run(&c.info_json(pool, &a))).expect("info");
    assert_eq!(info.size, 1 << 20);
    run(&c.snap_create(pool, &a, "s1"));
    run(&c.snap_create(pool, &a, "s2"));
    run(&c.meta_set(pool, &a, "virtkeep.base", "s2"));
    assert_eq!(run(&c.meta_get(pool, &a, "virtkeep.base")).trim(), "s2");
    run(&c.meta_remove(pool, &a, "virtkeep.base"));
    run(&c.snap_rm(pool, &a, "s1"));
    let snaps = parse_rbd_snap_ls_json(&run(&c.snap_ls_json(pool, &a))).expect("snaps");
    assert_eq!(
        snaps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["s2"]
    );
    run(&c.snap_purge(pool, &a));
    assert!(
        parse_rbd_snap_ls_json(&run(&c.snap_ls_json(pool, &a)))
            .expect("snaps")
            .is_empty()
    );
    run(&c.rename(pool, &a, &b));
    assert_eq!(
        parse_rbd_info_json(&run(&c.info_json(pool, &b)))
            .expect("info")
            .name,
        b
    );
    run(&c.rm(pool, &b));
}
