//! Restore rewrites: nothing changes but what was asked for.

use std::collections::BTreeMap;

use proptest::prelude::*;
use virtkeep_libvirt::{
    DiskAuth, DiskSource, NetHost, NewSource, Rewrite, XmlError, parse_domain, rewrite_domain,
};

const FIXTURES: &[&str] = &[
    "kvm-multi-disk.xml",
    "xen-pv.xml",
    "xen-hvm.xml",
    "rbd-auth.xml",
    "lvm-block.xml",
    "unknown-elements.xml",
];

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn all_fixtures() -> Vec<(String, String)> {
    let dir = format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let mut v: Vec<(String, String)> = FIXTURES
        .iter()
        .map(|n| ((*n).to_owned(), fixture(n)))
        .collect();
    for entry in std::fs::read_dir(dir).expect("dir") {
        let p = entry.expect("entry").path();
        let n = p
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        if n.starts_with("captured-dumpxml") {
            v.push((n, std::fs::read_to_string(&p).expect("read")));
        }
    }
    v
}

/// Lines that differ between two texts with the same line count: (index, old, new).
fn changed_lines(before: &str, after: &str) -> Vec<(usize, String, String)> {
    let b: Vec<&str> = before.split('\n').collect();
    let a: Vec<&str> = after.split('\n').collect();
    assert_eq!(b.len(), a.len(), "line count changed:\n{after}");
    b.iter()
        .zip(&a)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, (x, y))| (i, (*x).to_owned(), (*y).to_owned()))
        .collect()
}

/// `text` without the lines whose trimmed form satisfies `drop` in the given range
/// of (0-based) line numbers.
fn without_lines(text: &str, range: std::ops::Range<usize>) -> String {
    text.split('\n')
        .enumerate()
        .filter(|(i, _)| !range.contains(i))
        .map(|(_, l)| l)
        .collect::<Vec<_>>()
        .join("\n")
}

fn line_of(text: &str, needle: &str) -> usize {
    text.split('\n')
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle} not found"))
}

fn sources(target: &str, s: NewSource) -> BTreeMap<String, NewSource> {
    BTreeMap::from([(target.to_owned(), s)])
}

#[test]
fn empty_rewrite_is_byte_identical() {
    for (name, xml) in all_fixtures() {
        let out =
            rewrite_domain(&xml, &Rewrite::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(out, xml, "{name}");
        // CRLF line endings survive too.
        let crlf = xml.replace('\n', "\r\n");
        assert_eq!(
            rewrite_domain(&crlf, &Rewrite::default()).expect("crlf"),
            crlf
        );
    }
}

#[test]
fn rename_changes_only_the_name_line() {
    for (name, xml) in all_fixtures() {
        let rw = Rewrite {
            name: Some("restored <copy> & 'more' \"quotes\" – ü".into()),
            ..Default::default()
        };
        let out = rewrite_domain(&xml, &rw).expect("rewrite");
        let ch = changed_lines(&xml, &out);
        assert_eq!(ch.len(), 1, "{name}: {ch:?}");
        assert!(ch[0].1.contains("<name>"), "{name}");
        assert_eq!(
            parse_domain(&out).expect("parse").name,
            rw.name.clone().expect("name")
        );
    }
}

#[test]
fn new_uuid_replaces_or_inserts() {
    let xml = fixture("kvm-multi-disk.xml");
    let rw = Rewrite {
        new_uuid: Some("AAAAAAAA-BBBB-4CCC-8DDD-EEEEEEEEEEEE".into()),
        ..Default::default()
    };
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    let ch = changed_lines(&xml, &out);
    assert_eq!(
        ch,
        vec![(
            2,
            "  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>".to_owned(),
            "  <uuid>aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee</uuid>".to_owned()
        )]
    );
    // Hyphen-less UUID in the unknown-elements fixture.
    let xml = fixture("unknown-elements.xml");
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    assert_eq!(changed_lines(&xml, &out).len(), 1);

    // No <uuid>: inserted after <name>, same indentation.
    let xml = "<domain type='kvm'>\n  <name>a</name>\n  <memory>1</memory>\n</domain>\n";
    let out = rewrite_domain(xml, &rw).expect("rewrite");
    assert_eq!(
        out,
        "<domain type='kvm'>\n  <name>a</name>\n  <uuid>aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee</uuid>\n  <memory>1</memory>\n</domain>\n"
    );
    assert!(matches!(
        rewrite_domain(
            xml,
            &Rewrite {
                new_uuid: Some("not-a-uuid".into()),
                ..Default::default()
            }
        ),
        Err(XmlError::Rewrite(_))
    ));
}

#[test]
fn regenerate_macs_changes_only_mac_lines() {
    for (name, xml) in all_fixtures() {
        let before = parse_domain(&xml).expect("parse");
        let rw = Rewrite {
            regenerate_macs: true,
            ..Default::default()
        };
        let out = rewrite_domain(&xml, &rw).expect("rewrite");
        let after = parse_domain(&out).expect("parse");
        let ch = changed_lines(&xml, &out);
        let with_mac = before.interfaces.iter().filter(|i| i.mac.is_some()).count();
        assert_eq!(ch.len(), with_mac, "{name}");
        assert!(ch.iter().all(|(_, old, _)| old.contains("<mac ")), "{name}");
        let mut seen = std::collections::BTreeSet::new();
        for (b, a) in before.interfaces.iter().zip(&after.interfaces) {
            let (Some(old), Some(new)) = (&b.mac, &a.mac) else {
                assert_eq!(b.mac, a.mac);
                continue;
            };
            assert_ne!(old, new);
            assert!(new.starts_with("52:54:00:"), "{new}");
            assert_eq!(new.len(), 17);
            assert!(seen.insert(new.clone()), "duplicate {new}");
        }
    }
}

#[test]
fn remove_disk_drops_exactly_its_lines() {
    let xml = fixture("kvm-multi-disk.xml");
    let rw = Rewrite {
        remove_disks: vec!["vdc".into(), "sdb".into()],
        ..Default::default()
    };
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    // vdc: from its <disk> line to its </disk> line, same for sdb (later in the file).
    let vdc_start = line_of(&xml, "shared-quorum.img") - 2;
    let vdc_end = vdc_start + 9;
    let sdb_start = line_of(&xml, "<target dev='sdb'") - 2;
    let sdb_end = sdb_start + 7;
    let expected = without_lines(&without_lines(&xml, sdb_start..sdb_end), vdc_start..vdc_end);
    assert_eq!(out, expected);
    let d = parse_domain(&out).expect("parse");
    let targets: Vec<&str> = d.disks.iter().map(|x| x.target.as_str()).collect();
    assert_eq!(targets, ["vda", "vdb", "sda"]);

    // A one-line disk among others.
    let xml = fixture("unknown-elements.xml");
    let rw = Rewrite {
        remove_disks: vec!["vdb".into()],
        ..Default::default()
    };
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    let l = line_of(&xml, "inline.raw");
    assert_eq!(out, without_lines(&xml, l..l + 1));
}

#[test]
fn retarget_qcow2_file_and_drop_backing_store() {
    let xml = fixture("kvm-multi-disk.xml");
    let rw = Rewrite {
        disk_sources: sources(
            "vda",
            NewSource::File {
                path: "/restore/web01 (copy)/vda.qcow2".into(),
                format: "qcow2".into(),
            },
        ),
        drop_backing_store: true,
        ..Default::default()
    };
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    let src_line = line_of(&xml, "web01.qcow2");
    let bs_start = src_line + 1;
    let bs_end = line_of(&xml, "<target dev='vda'");
    let mut expected = without_lines(&xml, bs_start..bs_end);
    expected = expected.replace(
        "<source file='/var/lib/libvirt/images/web01.qcow2' index='3'/>",
        "<source file='/restore/web01 (copy)/vda.qcow2' index='3'/>",
    );
    assert_eq!(out, expected);
    let d = parse_domain(&out).expect("parse");
    let vda = d.disk("vda").expect("vda");
    assert!(vda.backing_chain.is_empty());
    // Other disks keep their <backingStore/>.
    assert!(out.matches("<backingStore/>").count() == 3);
}

#[test]
fn retarget_file_to_block_changes_type_and_attribute() {
    let xml = fixture("kvm-multi-disk.xml");
    let rw = Rewrite {
        disk_sources: sources(
            "vda",
            NewSource::Block {
                dev: "/dev/vg0/web01-vda".into(),
            },
        ),
        ..Default::default()
    };
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    let ch = changed_lines(&xml, &out);
    let new: Vec<&str> = ch.iter().map(|c| c.2.trim()).collect();
    assert_eq!(
        new,
        [
            "<disk type='block' device='disk'>",
            "<driver name='qemu' type='raw' discard='unmap'/>",
            "<source dev='/dev/vg0/web01-vda' index='3'/>",
        ]
    );
    let d = parse_domain(&out).expect("parse");
    let vda = d.disk("vda").expect("vda");
    assert_eq!(
        vda.source,
        DiskSource::Block {
            dev: "/dev/vg0/web01-vda".into()
        }
    );
    assert_eq!(vda.format.as_deref(), Some("raw"));
}

#[test]
fn retarget_xen_phy_block_to_qcow2_file() {
    let xml = fixture("xen-pv.xml");
    let rw = Rewrite {
        disk_sources: sources(
            "xvda",
            NewSource::File {
                path: "/srv/restore/mail-root.qcow2".into(),
                format: "qcow2".into(),
            },
        ),
        ..Default::default()
    };
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    let ch = changed_lines(&xml, &out);
    let new: Vec<&str> = ch.iter().map(|c| c.2.trim()).collect();
    assert_eq!(
        new,
        [
            "<disk type='file' device='disk'>",
            "<driver name='qemu' type='qcow2'/>",
            "<source file='/srv/restore/mail-root.qcow2'/>",
        ]
    );
    // Raw file onto an LV for a tap/aio disk keeps 'aio'.
    let rw = Rewrite {
        disk_sources: sources(
            "xvdb",
            NewSource::Block {
                dev: "/dev/vg_xen/spool".into(),
            },
        ),
        ..Default::default()
    };
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    let ch = changed_lines(&xml, &out);
    assert_eq!(ch.len(), 2, "{ch:?}");
    assert_eq!(
        parse_domain(&out)
            .expect("parse")
            .disk("xvdb")
            .expect("xvdb")
            .source,
        DiskSource::Block {
            dev: "/dev/vg_xen/spool".into()
        }
    );
}

#[test]
fn retarget_rbd_keeps_hosts_and_auth() {
    let xml = fixture("rbd-auth.xml");
    let rw = Rewrite {
        disk_sources: sources(
            "vda",
            NewSource::Rbd {
                pool: "restore".into(),
                image: "db-ceph-root-2".into(),
                hosts: vec![],
                auth: None,
            },
        ),
        ..Default::default()
    };
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    let ch = changed_lines(&xml, &out);
    assert_eq!(ch.len(), 1);
    assert_eq!(
        ch[0].2.trim(),
        "<source protocol='rbd' name='restore/db-ceph-root-2'>"
    );

    // New monitors and credentials replace the old ones in place.
    let rw = Rewrite {
        disk_sources: sources(
            "vda",
            NewSource::Rbd {
                pool: "restore".into(),
                image: "img".into(),
                hosts: vec![NetHost {
                    name: Some("192.0.2.1".into()),
                    port: Some("3300".into()),
                }],
                auth: Some(DiskAuth {
                    username: "backup".into(),
                    secret_type: Some("ceph".into()),
                    secret_uuid: Some("11111111-2222-4333-8444-555555555555".into()),
                    secret_usage: None,
                }),
            },
        ),
        ..Default::default()
    };
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    let d = parse_domain(&out).expect("parse");
    match &d.disk("vda").expect("vda").source {
        DiskSource::Network {
            name, hosts, auth, ..
        } => {
            assert_eq!(name.as_deref(), Some("restore/img"));
            assert_eq!(hosts.len(), 1);
            assert_eq!(hosts[0].name.as_deref(), Some("192.0.2.1"));
            assert_eq!(auth.as_ref().map(|a| a.username.as_str()), Some("backup"));
        }
        other => panic!("{other:?}"),
    }
    assert!(out.contains(
        "      <source protocol='rbd' name='restore/img'>\n        <host name='192.0.2.1' port='3300'/>\n        <auth username='backup'>\n          <secret type='ceph' uuid='11111111-2222-4333-8444-555555555555'/>\n        </auth>\n      </source>"
    ), "{out}");
    // Everything else is as it was.
    assert_eq!(d.disks.len(), 4);
    assert_eq!(
        parse_domain(&xml).expect("parse").disk("vdb"),
        d.disk("vdb")
    );
}

#[test]
fn retarget_file_to_rbd_and_rbd_to_file() {
    let xml = fixture("kvm-multi-disk.xml");
    let rw = Rewrite {
        disk_sources: sources(
            "vdb",
            NewSource::Rbd {
                pool: "vms".into(),
                image: "web01-vdb".into(),
                hosts: vec![NetHost {
                    name: Some("10.0.0.11".into()),
                    port: Some("6789".into()),
                }],
                auth: Some(DiskAuth {
                    username: "libvirt".into(),
                    secret_type: Some("ceph".into()),
                    secret_uuid: Some("b4f9b1f0-5a9e-4a41-9d1d-2f4f5f1d3c77".into()),
                    secret_usage: None,
                }),
            },
        ),
        drop_backing_store: true,
        ..Default::default()
    };
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    let d = parse_domain(&out).expect("parse");
    let vdb = d.disk("vdb").expect("vdb");
    assert_eq!(
        vdb.backend(),
        virtkeep_libvirt::Backend::Rbd {
            pool: "vms".into(),
            image: "web01-vdb".into()
        }
    );
    assert!(out.contains("<disk type='network' device='disk'>\n      <driver name='qemu' type='raw' cache='none' io='native'/>\n      <source protocol='rbd' name='vms/web01-vdb'>\n        <host name='10.0.0.11' port='6789'/>\n        <auth username='libvirt'>"), "{out}");

    // RBD with legacy disk-level <auth> back to a file: source and auth go.
    let xml = fixture("rbd-auth.xml");
    let rw = Rewrite {
        disk_sources: sources(
            "vdb",
            NewSource::File {
                path: "/restore/wal.raw".into(),
                format: "raw".into(),
            },
        ),
        ..Default::default()
    };
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    let d = parse_domain(&out).expect("parse");
    assert_eq!(
        d.disk("vdb").expect("vdb").source,
        DiskSource::File {
            path: "/restore/wal.raw".into()
        }
    );
    assert!(out.contains("    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source file='/restore/wal.raw'/>\n      <target dev='vdb' bus='virtio'/>\n    </disk>"), "{out}");
}

#[test]
fn retarget_keeps_foreign_quoting_and_children() {
    let xml = fixture("unknown-elements.xml");
    let rw = Rewrite {
        name: Some("copy".into()),
        disk_sources: sources(
            "vda",
            NewSource::File {
                path: "/new/\"path\" & <more>.qcow2".into(),
                format: "qcow2".into(),
            },
        ),
        drop_backing_store: true,
        ..Default::default()
    };
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    let ch = changed_lines(&xml, &out);
    assert_eq!(ch.len(), 2, "{ch:?}");
    assert_eq!(
        ch[1].2.trim(),
        "<source file=\"/new/&quot;path&quot; &amp; &lt;more&gt;.qcow2\">"
    );
    assert_eq!(
        parse_domain(&out)
            .expect("parse")
            .disk("vda")
            .expect("vda")
            .source,
        DiskSource::File {
            path: "/new/\"path\" & <more>.qcow2".into()
        }
    );
}

#[test]
fn empty_cdrom_gets_a_source() {
    let xml = fixture("kvm-multi-disk.xml");
    let rw = Rewrite {
        disk_sources: sources(
            "sdb",
            NewSource::File {
                path: "/iso/x.iso".into(),
                format: "raw".into(),
            },
        ),
        ..Default::default()
    };
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    assert!(out.contains("      <driver name='qemu' type='raw'/>\n      <source file='/iso/x.iso'/>\n      <target dev='sdb' bus='sata'/>"), "{out}");
}

#[test]
fn nvram_path() {
    let xml = fixture("lvm-block.xml");
    let rw = Rewrite {
        nvram: Some("/var/lib/libvirt/qemu/nvram/copy_VARS.fd".into()),
        ..Default::default()
    };
    let out = rewrite_domain(&xml, &rw).expect("rewrite");
    assert_eq!(changed_lines(&xml, &out).len(), 1);
    assert_eq!(
        parse_domain(&out).expect("parse").nvram.as_deref(),
        Some("/var/lib/libvirt/qemu/nvram/copy_VARS.fd")
    );
    assert!(rewrite_domain(&fixture("xen-pv.xml"), &rw).is_err());
}

#[test]
fn invalid_rewrites_fail_closed() {
    let xml = fixture("kvm-multi-disk.xml");
    let bad = [
        Rewrite {
            remove_disks: vec!["vdz".into()],
            ..Default::default()
        },
        Rewrite {
            disk_sources: sources(
                "vdz",
                NewSource::Block {
                    dev: "/dev/x".into(),
                },
            ),
            ..Default::default()
        },
        Rewrite {
            remove_disks: vec!["vda".into()],
            disk_sources: sources(
                "vda",
                NewSource::Block {
                    dev: "/dev/x".into(),
                },
            ),
            ..Default::default()
        },
        Rewrite {
            name: Some("a/b".into()),
            ..Default::default()
        },
        Rewrite {
            name: Some(String::new()),
            ..Default::default()
        },
        Rewrite {
            name: Some("bell\u{7}".into()),
            ..Default::default()
        },
    ];
    for rw in bad {
        assert!(
            matches!(rewrite_domain(&xml, &rw), Err(XmlError::Rewrite(_))),
            "{rw:?}"
        );
    }
    assert!(matches!(
        rewrite_domain("<domain><name>x</name>", &Rewrite::default()),
        Err(XmlError::Syntax { .. })
    ));
}

fn xml_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::char::range(' ', '~'),
        1 => Just('\t'),
        1 => Just('\n'),
        1 => Just('\r'),
        2 => proptest::char::range('\u{a0}', '\u{d7ff}'),
        1 => proptest::char::range('\u{e000}', '\u{fffd}'),
        1 => proptest::char::range('\u{10000}', '\u{10ffff}'),
    ]
}

proptest! {
    #[test]
    fn arbitrary_names_round_trip(chars in proptest::collection::vec(xml_char(), 1..40)) {
        let name: String = chars.into_iter().filter(|c| *c != '/').collect();
        prop_assume!(!name.is_empty());
        for fixture_name in ["kvm-multi-disk.xml", "unknown-elements.xml"] {
            let xml = fixture(fixture_name);
            let rw = Rewrite { name: Some(name.clone()), ..Default::default() };
            let out = rewrite_domain(&xml, &rw).expect("rewrite");
            prop_assert_eq!(&parse_domain(&out).expect("parse").name, &name);
            // Only the name changed: renaming back restores the original bytes
            // when the original name was written without entities.
            if fixture_name == "kvm-multi-disk.xml" {
                let back = Rewrite { name: Some("web01".into()), ..Default::default() };
                prop_assert_eq!(rewrite_domain(&out, &back).expect("back"), xml);
            }
        }
    }

    #[test]
    fn arbitrary_paths_round_trip(chars in proptest::collection::vec(xml_char(), 1..40)) {
        let path: String = format!("/{}", chars.into_iter().collect::<String>());
        let xml = fixture("kvm-multi-disk.xml");
        let rw = Rewrite {
            disk_sources: sources("vdb", NewSource::File { path: path.clone(), format: "raw".into() }),
            ..Default::default()
        };
        let out = rewrite_domain(&xml, &rw).expect("rewrite");
        let d = parse_domain(&out).expect("parse");
        prop_assert_eq!(&d.disk("vdb").expect("vdb").source, &DiskSource::File { path });
    }
}

/// `disk_element` returns the `<disk>` of one target as written (what `virsh blockcopy
/// --xml` reads), and refuses a target the domain does not have.
#[test]
fn disk_element_of_a_target() {
    let xml = fixture("rbd-auth.xml");
    let dom = parse_domain(&xml).expect("parse");
    for d in &dom.disks {
        let e = virtkeep_libvirt::disk_element(&xml, &d.target).expect("disk");
        assert!(e.starts_with("<disk") && e.ends_with("</disk>"), "{e}");
        assert!(e.contains(&format!("dev='{}'", d.target)), "{e}");
        assert!(xml.contains(&e));
        let one = parse_domain(&format!(
            "<domain><name>x</name><devices>{e}</devices></domain>"
        ))
        .expect("parse the element");
        assert_eq!(one.disks.len(), 1);
        assert_eq!(one.disks[0].source, d.source);
    }
    assert!(virtkeep_libvirt::disk_element(&xml, "vdzz").is_err());
}
