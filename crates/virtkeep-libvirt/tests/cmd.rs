//! Command lines, exactly as the remote shell gets them. The virsh/qemu-nbd/rbd forms
//! here were run against this machine's libvirt 9.0 / QEMU 7.2 / Ceph 16 (see the
//! captured fixtures).

use virtkeep_libvirt::cmd::{self, CephArgs, UndefineOptions, Virsh};

fn v() -> Virsh {
    Virsh::new("qemu:///system")
}

#[test]
fn virsh_basics() {
    let v = v();
    assert_eq!(
        v.list_all_names().render(),
        "LC_ALL=C virsh -c qemu:///system list --all --name"
    );
    assert_eq!(
        v.dumpxml("web01", true).render(),
        "LC_ALL=C virsh -c qemu:///system dumpxml --domain web01 --inactive --security-info"
    );
    assert_eq!(
        v.dumpxml("it's $(touch /tmp/x)", false).render(),
        r"LC_ALL=C virsh -c qemu:///system dumpxml --domain 'it'\''s $(touch /tmp/x)' --security-info"
    );
    assert_eq!(
        v.domstate("-rf").render(),
        "LC_ALL=C virsh -c qemu:///system domstate --domain -rf"
    );
    assert_eq!(
        Virsh::new("xen:///system").domuuid("a b").render(),
        "LC_ALL=C virsh -c xen:///system domuuid --domain 'a b'"
    );
    assert_eq!(
        v.domname("6b1c1e0e-5b5a-4c4e-9d43-0a1b2c3d4e5f").render(),
        "LC_ALL=C virsh -c qemu:///system domname --domain 6b1c1e0e-5b5a-4c4e-9d43-0a1b2c3d4e5f"
    );
    assert_eq!(
        v.dominfo("x").render(),
        "LC_ALL=C virsh -c qemu:///system dominfo --domain x"
    );
    assert_eq!(
        v.domblklist_details("x").render(),
        "LC_ALL=C virsh -c qemu:///system domblklist --domain x --details"
    );
    assert_eq!(
        v.version().render(),
        "LC_ALL=C virsh -c qemu:///system version --daemon"
    );
    assert_eq!(
        v.domcapabilities(Some("kvm")).render(),
        "LC_ALL=C virsh -c qemu:///system domcapabilities --virttype kvm"
    );
    assert_eq!(
        v.capabilities().render(),
        "LC_ALL=C virsh -c qemu:///system capabilities"
    );
    assert_eq!(
        v.pool_list().render(),
        "LC_ALL=C virsh -c qemu:///system pool-list --all --name"
    );
    assert_eq!(
        v.secret_list().render(),
        "LC_ALL=C virsh -c qemu:///system secret-list"
    );
}

#[test]
fn snapshot_create_disk_only_escapes_commas() {
    let c = v().snapshot_create_disk_only(
        "web01",
        "vk-20260101",
        &[
            ("vda", "/var/lib/libvirt/images/web01.vk-1"),
            ("vdb", "/srv/a,b c.vk-1"),
        ],
        &["vdc"],
        true,
    );
    assert_eq!(
        c.render(),
        "LC_ALL=C virsh -c qemu:///system snapshot-create-as --domain web01 --name vk-20260101 \
         --disk-only --atomic --no-metadata --quiesce \
         --diskspec 'vda,snapshot=external,file=/var/lib/libvirt/images/web01.vk-1' \
         --diskspec 'vdb,snapshot=external,file=/srv/a,,b c.vk-1' \
         --diskspec 'vdc,snapshot=no'"
    );
    let c = v().snapshot_create_disk_only("d", "s", &[("vda", "/x")], &[], false);
    assert!(!c.render().contains("--quiesce"));
}

#[test]
fn block_jobs_and_lifecycle() {
    let v = v();
    assert_eq!(
        v.blockcommit_active_pivot("web01", "vda").render(),
        "LC_ALL=C virsh -c qemu:///system blockcommit --domain web01 --path vda --active --pivot --wait"
    );
    assert_eq!(
        v.blockjob_abort("web01", "vda").render(),
        "LC_ALL=C virsh -c qemu:///system blockjob --domain web01 --path vda --abort"
    );
    assert_eq!(
        v.blockjob_pivot("web01", "vda").render(),
        "LC_ALL=C virsh -c qemu:///system blockjob --domain web01 --path vda --pivot"
    );
    assert_eq!(
        v.blockjob_info("web01", "vda").render(),
        "LC_ALL=C virsh -c qemu:///system blockjob --domain web01 --path vda --info --bytes"
    );
    assert_eq!(
        v.define("/tmp/vk x/dom.xml").render(),
        "LC_ALL=C virsh -c qemu:///system define --file '/tmp/vk x/dom.xml'"
    );
    let all = UndefineOptions {
        nvram: true,
        keep_nvram: false,
        snapshots_metadata: true,
        checkpoints_metadata: true,
    };
    assert_eq!(
        v.undefine("d", all).render(),
        "LC_ALL=C virsh -c qemu:///system undefine --domain d --nvram --snapshots-metadata --checkpoints-metadata"
    );
    assert_eq!(
        v.undefine("d", UndefineOptions::default()).render(),
        "LC_ALL=C virsh -c qemu:///system undefine --domain d"
    );
    assert_eq!(
        v.undefine(
            "d",
            UndefineOptions {
                keep_nvram: true,
                ..Default::default()
            }
        )
        .render(),
        "LC_ALL=C virsh -c qemu:///system undefine --domain d --keep-nvram"
    );
    assert_eq!(
        v.start("d").render(),
        "LC_ALL=C virsh -c qemu:///system start --domain d"
    );
    assert_eq!(
        v.destroy("d").render(),
        "LC_ALL=C virsh -c qemu:///system destroy --domain d"
    );
    assert_eq!(
        v.checkpoint_list("d").render(),
        "LC_ALL=C virsh -c qemu:///system checkpoint-list --domain d --name"
    );
    assert_eq!(
        v.checkpoint_delete("d", "vk-1", true).render(),
        "LC_ALL=C virsh -c qemu:///system checkpoint-delete --domain d --checkpointname vk-1 --metadata"
    );
    assert_eq!(
        v.checkpoint_create("d", "/tmp/c.xml").render(),
        "LC_ALL=C virsh -c qemu:///system checkpoint-create --domain d --xmlfile /tmp/c.xml"
    );
    assert_eq!(
        v.backup_begin("d", "/tmp/b.xml", Some("/tmp/c.xml"))
            .render(),
        "LC_ALL=C virsh -c qemu:///system backup-begin --domain d --backupxml /tmp/b.xml --checkpointxml /tmp/c.xml"
    );
    assert_eq!(
        v.domjobabort("d").render(),
        "LC_ALL=C virsh -c qemu:///system domjobabort --domain d"
    );
    assert_eq!(
        v.snapshot_list("d").render(),
        "LC_ALL=C virsh -c qemu:///system snapshot-list --domain d --name"
    );
    assert_eq!(
        v.domfsfreeze("d").render(),
        "LC_ALL=C virsh -c qemu:///system domfsfreeze --domain d"
    );
    assert_eq!(
        v.domfsthaw("d").render(),
        "LC_ALL=C virsh -c qemu:///system domfsthaw --domain d"
    );
    assert_eq!(
        v.qemu_agent_ping("d", 5).render(),
        r#"LC_ALL=C virsh -c qemu:///system qemu-agent-command --domain d --timeout 5 '{"execute":"guest-ping"}'"#
    );
}

#[test]
fn qemu_img() {
    assert_eq!(
        cmd::qemu_img_info_json("/var/lib/x.qcow2", Some("qcow2"), true).render(),
        "qemu-img info '--output=json' -f qcow2 -U /var/lib/x.qcow2"
    );
    assert_eq!(
        cmd::qemu_img_info_json("-x:y", None, false).render(),
        "qemu-img info '--output=json' ./-x:y"
    );
    assert_eq!(
        cmd::qemu_img_create_qcow2("/r/a b.qcow2", 1 << 30, None).render(),
        "qemu-img create -q -f qcow2 '/r/a b.qcow2' 1073741824"
    );
    assert_eq!(
        cmd::qemu_img_create_qcow2("/r/o.qcow2", 512, Some(("/r/base.raw", "raw"))).render(),
        "qemu-img create -q -f qcow2 -b /r/base.raw -F raw /r/o.qcow2 512"
    );
    assert_eq!(
        cmd::qemu_img_create_overlay("/r/o.vk", "/r/base.qcow2", "qcow2").render(),
        "qemu-img create -q -f qcow2 -b /r/base.qcow2 -F qcow2 /r/o.vk"
    );
    assert_eq!(
        cmd::qemu_img_create_raw("/r/d.raw", 4096).render(),
        "qemu-img create -q -f raw /r/d.raw 4096"
    );
    assert_eq!(
        cmd::qemu_img_map_json("/r/d", Some("raw"), true).render(),
        "qemu-img map '--output=json' -f raw -U /r/d"
    );
    assert_eq!(
        cmd::qemu_img_commit("/r/o.vk").render(),
        "qemu-img commit -q -f qcow2 /r/o.vk"
    );
}

#[test]
fn qemu_nbd_image_opts_escape_commas() {
    let opts = cmd::image_opts("qcow2", "/srv/vm,1/disk, a.qcow2", false, true);
    assert_eq!(
        opts,
        "driver=qcow2,force-share=on,file.driver=file,file.filename=/srv/vm,,1/disk,, a.qcow2"
    );
    assert_eq!(
        cmd::image_opts("raw", "/dev/vg0/lv", true, false),
        "driver=raw,file.driver=host_device,file.filename=/dev/vg0/lv"
    );
    assert_eq!(
        cmd::qemu_nbd_export_readonly(&opts, "/tmp/vk.x/nbd.sock", "/tmp/vk.x/nbd.pid").render(),
        "qemu-nbd -r --fork --persistent '--shared=8' '--socket=/tmp/vk.x/nbd.sock' \
         '--pid-file=/tmp/vk.x/nbd.pid' --image-opts \
         'driver=qcow2,force-share=on,file.driver=file,file.filename=/srv/vm,,1/disk,, a.qcow2'"
    );
    assert_eq!(
        cmd::qemu_nbd_export_writable("/r/x.raw", "raw", false, false, "/s", "/p").render(),
        "qemu-nbd --fork --persistent '--shared=8' '--discard=unmap' '--socket=/s' '--pid-file=/p' \
         --image-opts 'driver=raw,file.driver=file,file.filename=/r/x.raw'"
    );
    assert_eq!(
        cmd::qemu_nbd_export_writable("/r/x.raw", "raw", false, true, "/s", "/p").render(),
        "qemu-nbd --fork --persistent '--shared=8' '--discard=unmap' '--cache=none' '--socket=/s' \
         '--pid-file=/p' --image-opts 'driver=raw,file.driver=file,file.filename=/r/x.raw'"
    );
    assert_eq!(cmd::escape_commas("a,,b,"), "a,,,,b,,");
}

#[test]
fn lvm() {
    assert_eq!(
        cmd::lvs_json(None).render(),
        "lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_size,lv_attr,pool_lv,origin,data_percent,lv_path,lv_tags"
    );
    assert_eq!(
        cmd::lvs_json(Some("vg0")).render(),
        "lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_size,lv_attr,pool_lv,origin,data_percent,lv_path,lv_tags vg0"
    );
    assert_eq!(
        cmd::vgs_json().render(),
        "vgs --reportformat json --units b --nosuffix -o vg_name,vg_size,vg_free,vg_extent_size"
    );
    assert_eq!(
        cmd::lvcreate_snapshot("vg0", "root", "root.vk-1", Some(1 << 30)).render(),
        "lvcreate -s -n root.vk-1 -L 1073741824b vg0/root"
    );
    assert_eq!(
        cmd::lvcreate_snapshot("vg0", "thin1", "thin1.vk-1", None).render(),
        "lvcreate -s -n thin1.vk-1 -kn vg0/thin1"
    );
    assert_eq!(
        cmd::lvremove("vg0", "root.vk-1").render(),
        "lvremove -f vg0/root.vk-1"
    );
    assert_eq!(
        cmd::lvcreate("vg0", "restored", 16 << 20).render(),
        "lvcreate --yes -Wy -Zy -n restored -L 16777216b vg0"
    );
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
    ];
    let allowed = [
        "--format",
        "--no-progress",
        "--image=--keyring=/tmp/evil/-x",
        "--image=--keyring=/tmp/evil/-x@--pool=other",
        "--from-snap=--pool=other",
        "--size=1B",
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
fn files_and_locks() {
    assert_eq!(
        cmd::chown("libvirt-qemu:kvm", "/r/a b").render(),
        "chown -- libvirt-qemu:kvm '/r/a b'"
    );
    assert_eq!(cmd::rm_f("-rf /").render(), "rm -f -- '-rf /'");
    assert_eq!(
        cmd::stat("/r/x").render(),
        "stat -L -c '%s\t%U\t%G\t%a\t%F' -- /r/x"
    );
    assert_eq!(
        cmd::mkdir_p("/r/new dir").render(),
        "mkdir -p -- '/r/new dir'"
    );
    assert_eq!(
        cmd::df_avail("/var/lib/libvirt/images").render(),
        "df -B1 '--output=avail' -- /var/lib/libvirt/images"
    );
    assert_eq!(
        cmd::mktemp_d(None).render(),
        "mktemp -d virtkeep.XXXXXXXXXX"
    );
    assert_eq!(
        cmd::mktemp_d(Some("/var/tmp")).render(),
        "mktemp -d -p /var/tmp virtkeep.XXXXXXXXXX"
    );
    let inner = cmd::rm_f("/tmp/it's");
    assert_eq!(
        cmd::flock_run("/run/vk/web01.lock", None, &inner).render(),
        r"flock -E 75 -n /run/vk/web01.lock sh -c 'rm -f -- '\''/tmp/it'\''\'\'''\''s'\'''"
    );
    assert_eq!(
        cmd::flock_hold("/run/vk/a.lock", Some(10)).render(),
        "flock -E 75 -w 10 /run/vk/a.lock sh -c 'echo locked && exec cat >/dev/null'"
    );
}

/// The rendered lines really run: qemu-img create/info and the flock/stat/df helpers
/// against a temporary directory on this machine (skipped where a tool is missing).
#[test]
fn rendered_commands_run_locally() {
    let have = |t: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let sh = |c: &virtkeep_ssh::RemoteCommand| {
        std::process::Command::new("sh")
            .args(["-c", &c.render()])
            .output()
            .expect("sh")
    };
    let path = dir.path().join("a, b 'c'.qcow2");
    let path = path.to_str().expect("utf8");
    if have("qemu-img") {
        let out = sh(&cmd::qemu_img_create_qcow2(path, 1 << 20, None));
        assert!(out.status.success(), "{out:?}");
        let out = sh(&cmd::qemu_img_info_json(path, Some("qcow2"), true));
        assert!(out.status.success(), "{out:?}");
        let info = virtkeep_libvirt::parse::parse_qemu_img_info(
            std::str::from_utf8(&out.stdout).expect("utf8"),
        )
        .expect("parse");
        assert_eq!(info.virtual_size, 1 << 20);
        assert_eq!(info.format, "qcow2");
    }
    let out = sh(&cmd::df_avail(dir.path().to_str().expect("utf8")));
    assert!(out.status.success());
    assert!(
        virtkeep_libvirt::parse::parse_df_avail(std::str::from_utf8(&out.stdout).expect("utf8"))
            .expect("df")
            > 0
    );
    let f = dir.path().join("x y");
    std::fs::write(&f, b"12345").expect("write");
    let out = sh(&cmd::stat(f.to_str().expect("utf8")));
    let st = virtkeep_libvirt::parse::parse_stat(std::str::from_utf8(&out.stdout).expect("utf8"))
        .expect("stat");
    assert_eq!(st.size, 5);
    assert_eq!(st.file_type, "regular file");
    if have("flock") {
        let lock = dir.path().join("l");
        let lock = lock.to_str().expect("utf8");
        let target = dir.path().join("it's");
        std::fs::write(&target, b"").expect("write");
        let out = sh(&cmd::flock_run(
            lock,
            None,
            &cmd::rm_f(target.to_str().expect("utf8")),
        ));
        assert!(out.status.success(), "{out:?}");
        assert!(!target.exists());
        // Held lock → status 75.
        let mut holder = std::process::Command::new("sh")
            .args(["-c", &cmd::flock_hold(lock, None).render()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut buf = [0u8; 7];
        std::io::Read::read_exact(holder.stdout.as_mut().expect("stdout"), &mut buf).expect("read");
        assert_eq!(&buf, b"locked\n");
        let out = sh(&cmd::flock_run(lock, None, &cmd::rm_f("/nonexistent")));
        assert_eq!(out.status.code(), Some(cmd::FLOCK_CONFLICT_STATUS as i32));
        drop(holder.stdin.take());
        assert!(holder.wait().expect("wait").success());
        let out = sh(&cmd::flock_run(lock, None, &cmd::rm_f("/nonexistent")));
        assert!(out.status.success());
    }
}
