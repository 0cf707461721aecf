//! `virsh` builders (exactly as the remote shell gets them; run against this machine's
//! libvirt 9.0) and parsers (on output captured from it, tests/fixtures/captured).

use virtkeep_libvirt::ParseError;
use virtkeep_libvirt::virsh::*;

fn v() -> Virsh {
    Virsh::new("qemu:///system")
}

fn captured(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/captured/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
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
        v.version().render(),
        "LC_ALL=C virsh -c qemu:///system version --daemon"
    );
    assert_eq!(
        v.domcapabilities(Some("kvm")).render(),
        "LC_ALL=C virsh -c qemu:///system domcapabilities --virttype kvm"
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
        v.blockcommit_active_pivot("web01", "vda", "/var/lib/libvirt/images/-web01.qcow2")
            .render(),
        "LC_ALL=C virsh -c qemu:///system blockcommit --domain web01 --path vda --base /var/lib/libvirt/images/-web01.qcow2 --active --pivot --wait"
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
        v.backup_begin("d", "/tmp/b.xml", Some("/tmp/c.xml"))
            .render(),
        "LC_ALL=C virsh -c qemu:///system backup-begin --domain d --backupxml /tmp/b.xml --checkpointxml /tmp/c.xml"
    );
    assert_eq!(
        v.domjobabort("d").render(),
        "LC_ALL=C virsh -c qemu:///system domjobabort --domain d"
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
fn named_builders_for_every_engine_line() {
    let v = v();
    let pre = "LC_ALL=C virsh -c qemu:///system";
    assert_eq!(
        v.list_all_uuids().render(),
        format!("{pre} list --all --uuid")
    );
    assert_eq!(v.list_active_uuids().render(), format!("{pre} list --uuid"));
    assert_eq!(
        v.domblkinfo_all("-d").render(),
        format!("{pre} domblkinfo --domain -d --all")
    );
    assert_eq!(
        v.suspend("-d").render(),
        format!("{pre} suspend --domain -d")
    );
    assert_eq!(v.resume("d").render(), format!("{pre} resume --domain d"));
    assert_eq!(
        v.start_paused("d").render(),
        format!("{pre} start --domain d --paused")
    );
    assert_eq!(
        v.blockcommit("d", "vda", "/r/a.vk", "/r/a").render(),
        format!("{pre} blockcommit --domain d --path vda --top /r/a.vk --base /r/a --wait")
    );
    assert_eq!(
        v.backup_dumpxml("d").render(),
        format!("{pre} backup-dumpxml --domain d")
    );
    assert_eq!(
        v.secret_dumpxml("-s").render(),
        format!("{pre} secret-dumpxml --secret -s")
    );
    assert_eq!(
        v.help("blockcommit").render(),
        format!("{pre} help --command blockcommit")
    );
    assert_eq!(
        v.describe("d").render(),
        format!(
            r"{pre} dumpxml --domain d --security-info && printf '\0' && {pre} dumpxml --domain d --inactive --security-info && printf '\0' && {pre} domstate --domain d"
        )
    );
}

/// `describe_uuid` is one virsh process with one script argument, built only from a
/// canonical UUID and the mark.
#[test]
fn describe_uuid_is_one_script() {
    let v = Virsh::new("qemu:///system");
    let u = "5bf43c92-e511-4cf4-b4a3-ad34eb4c237b";
    let uuid = DomainUuid::parse(u).expect("a canonical UUID");
    let m = "vk-mark-000000000000000000000000000000ff";
    assert_eq!(
        v.describe_uuid(&uuid, 0xff).render(),
        format!(
            "LC_ALL=C virsh -c qemu:///system 'dumpxml --domain {u} --security-info; echo {m}; dumpxml --domain {u} --inactive --security-info; echo {m}; checkpoint-list --domain {u} --name; echo {m}; domstate --domain {u}'"
        )
    );
    for bad in [
        "",
        "vm1",
        "5bf43c92-e511-4cf4-b4a3-ad34eb4c237",
        "5bf43c92-e511-4cf4-b4a3-ad34eb4c237b ",
        "5bf43c92 e511-4cf4-b4a3-ad34eb4c237b",
        "5bf43c92-e511-4cf4-b4a3;ad34eb4c237b",
        "-bf43c92-e511-4cf4-b4a3-ad34eb4c237b",
        "5bf43c92e5114cf4b4a3ad34eb4c237b",
    ] {
        assert_eq!(DomainUuid::parse(bad), None, "{bad:?}");
    }
}

/// The end of a backup job: one virsh process, one script from a canonical UUID and a
/// checked checkpoint name; a name virsh would split or read as an option is refused.
#[test]
fn abort_job_then_delete_checkpoint_is_one_script() {
    let v = Virsh::new("qemu:///system");
    let u = "5bf43c92-e511-4cf4-b4a3-ad34eb4c237b";
    let uuid = DomainUuid::parse(u).expect("a canonical UUID");
    let c = "virtkeep-20261207T170119Z-6b0c7505";
    let cp = CheckpointName::parse(c).expect("a plain name");
    assert_eq!(
        v.abort_job_then_delete_checkpoint(&uuid, &cp).render(),
        format!(
            "LC_ALL=C virsh -c qemu:///system 'domjobabort --domain {u}; checkpoint-delete --domain {u} --checkpointname {c}'"
        )
    );
    let long = "a".repeat(129);
    for bad in [
        "",
        "-virtkeep",
        "--help",
        "virtkeep-1; undefine --domain x",
        "virtkeep-1 x",
        "virtkeep-'1",
        "virtkeep-\"1",
        "virtkeep-1#",
        "virtkeep-1\\",
        "virtkeep-1\n",
        "virtkeep-\u{e9}",
        long.as_str(),
    ] {
        assert_eq!(CheckpointName::parse(bad), None, "{bad:?}");
    }
    assert!(CheckpointName::parse(&"a".repeat(128)).is_some());
}

/// The four answers of `describe_uuid` come apart at whole lines that are the mark, as
/// virsh prints them (each command's output, then an empty line).
#[test]
fn described_output() {
    let m = "vk-mark-000000000000000000000000000000ff";
    let xml = "<domain>\n  <name>a</name>\n</domain>\n";
    let out = format!("{xml}\n{m}\n{xml}\n{m}\nvirtkeep-1\nvirtkeep-2\n\n{m}\nrunning\n\n");
    let d = parse_described(&out, 0xff).expect("four parts");
    assert_eq!(d.xml, format!("{xml}\n"));
    assert_eq!(d.inactive_xml, format!("{xml}\n"));
    assert_eq!(d.checkpoints, vec!["virtkeep-1", "virtkeep-2"]);
    assert_eq!(d.state, "running\n\n");
    // No checkpoints, or listing them failed: virsh prints an empty line either way.
    let out = format!("{xml}\n{m}\n{xml}\n{m}\n\n{m}\nshut off\n\n");
    let d = parse_described(&out, 0xff).expect("four parts");
    assert!(d.checkpoints.is_empty());
    // Another mark, a mark inside a line, or a missing part: not this output.
    assert_eq!(parse_described(&out, 0xfe), None);
    let inside = format!("{xml}x{m}\n{xml}\n{m}\n\n{m}\nshut off\n");
    assert_eq!(parse_described(&inside, 0xff), None);
    assert_eq!(
        parse_described(&format!("{xml}\n{m}\nrunning\n"), 0xff),
        None
    );
}

/// The three answers of `describe` come apart at the NULs, only when there are three.
#[test]
fn describe_output() {
    assert_eq!(
        parse_describe("<domain/>\n\0<domain a=''/>\n\0running\n\n"),
        Some(("<domain/>\n", "<domain a=''/>\n", "running\n\n"))
    );
    assert_eq!(parse_describe("<domain/>\0running"), None);
    assert_eq!(parse_describe("a\0b\0c\0d"), None);
}

#[test]
fn domblkinfo_all() {
    let out = "Target     Capacity      Allocation   Physical\n\
               -----------------------------------------------------\n\
               vda        1073741824    200704       1073741824\n\
               sdb        -             -            -\n\
               vdb        5242880       5242880      5242880\n";
    assert_eq!(
        parse_domblkinfo_all(out),
        vec![
            ("vda".to_string(), 1 << 30, 200_704),
            ("vdb".to_string(), 5 << 20, 5 << 20)
        ]
    );
}

/// The new virsh forms run against this machine's libvirt (skipped without one).
#[test]
fn virsh_forms_are_accepted() {
    let ok = |c: &virtkeep_ssh::RemoteCommand| {
        std::process::Command::new("sh")
            .args(["-c", &format!("{} >/dev/null 2>&1", c.render())])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let v = Virsh::new("qemu:///system");
    if !ok(&v.version()) {
        return;
    }
    assert!(ok(&v.help("blockcommit")));
    assert!(!ok(&v.help("no-such-command")));
    assert!(ok(&v.list_all_uuids()));
    assert!(ok(&v.list_active_uuids()));
}

/// `domcapabilities_for` takes the domain type and architecture from a backup's XML:
/// plain words only, never an option or a second argument.
#[test]
fn domcapabilities_for_takes_plain_words_only() {
    let v = v();
    assert_eq!(
        v.domcapabilities_for("qemu", Some("x86_64"))
            .expect("plain")
            .render(),
        "LC_ALL=C virsh -c qemu:///system domcapabilities --virttype qemu --arch x86_64"
    );
    for (t, a) in [
        ("-x", None),
        ("", None),
        ("kvm", Some("--all")),
        ("kvm", Some("x86_64 y")),
    ] {
        assert!(v.domcapabilities_for(t, a).is_none(), "{t:?} {a:?}");
    }
    let xml =
        "<domain type='qemu'><os><type arch='aarch64' machine='virt'>hvm</type></os></domain>";
    assert_eq!(
        virtkeep_libvirt::arch_of(xml).expect("xml").as_deref(),
        Some("aarch64")
    );
    assert_eq!(virtkeep_libvirt::arch_of("<domain/>").expect("xml"), None);
}
