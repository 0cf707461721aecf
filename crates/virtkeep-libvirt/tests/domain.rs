//! Reading domain XML: every fixture parses and classifies as expected.

use virtkeep_libvirt::{
    Backend, DiskAuth, DiskDevice, DiskSource, NetHost, SkipReason, XmlError, parse_domain,
};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn kvm_multi_disk() {
    let d = parse_domain(&fixture("kvm-multi-disk.xml")).expect("parse");
    assert_eq!(d.name, "web01");
    assert_eq!(
        d.uuid.as_deref(),
        Some("4dea22b3-1d52-d8f3-2516-782e98ab3fa0")
    );
    assert_eq!(d.kind, "kvm");
    assert_eq!(d.id, Some(7));
    assert_eq!(d.os_type.as_deref(), Some("hvm"));
    assert!(d.has_guest_agent_channel);
    assert!(!d.is_xen());
    assert_eq!(d.disks.len(), 5);

    let vda = d.disk("vda").expect("vda");
    assert_eq!(vda.device, DiskDevice::Disk);
    assert_eq!(vda.bus.as_deref(), Some("virtio"));
    assert_eq!(vda.driver_name.as_deref(), Some("qemu"));
    assert_eq!(vda.format.as_deref(), Some("qcow2"));
    assert_eq!(
        vda.source,
        DiskSource::File {
            path: "/var/lib/libvirt/images/web01.qcow2".into()
        }
    );
    assert_eq!(
        vda.backing_chain,
        vec![
            "/var/lib/libvirt/images/base/debian12.qcow2".to_owned(),
            "/var/lib/libvirt/images/base/debian12-golden.raw".to_owned()
        ]
    );
    assert_eq!(vda.alias.as_deref(), Some("virtio-disk0"));
    assert_eq!(vda.backend(), Backend::QcowFile);
    assert_eq!(vda.is_backup_candidate(), Ok(()));

    let vdb = d.disk("vdb").expect("vdb");
    assert_eq!(vdb.backend(), Backend::RawFile);
    assert!(vdb.backing_chain.is_empty());
    assert_eq!(vdb.source_display(), "/srv/vm disks/web01, data.img");
    assert_eq!(vdb.is_backup_candidate(), Ok(()));

    let vdc = d.disk("vdc").expect("vdc");
    assert!(vdc.shareable);
    assert_eq!(vdc.is_backup_candidate(), Err(SkipReason::Shareable));

    let sda = d.disk("sda").expect("sda");
    assert_eq!(sda.device, DiskDevice::Cdrom);
    assert!(sda.readonly);
    assert_eq!(sda.is_backup_candidate(), Err(SkipReason::Cdrom));
    assert!(SkipReason::Cdrom.to_string().contains("CD-ROM"));

    let sdb = d.disk("sdb").expect("sdb");
    assert_eq!(sdb.source, DiskSource::Empty);
    assert_eq!(sdb.is_backup_candidate(), Err(SkipReason::Cdrom));

    assert_eq!(d.interfaces.len(), 2);
    assert_eq!(d.interfaces[0].mac.as_deref(), Some("52:54:00:6b:3c:58"));
    assert_eq!(d.interfaces[0].kind, "network");
    assert_eq!(d.interfaces[1].kind, "bridge");
}

#[test]
fn xen_pv() {
    let d = parse_domain(&fixture("xen-pv.xml")).expect("parse");
    assert_eq!(d.kind, "xen");
    assert!(d.is_xen());
    assert_eq!(d.os_type.as_deref(), Some("linux"));
    assert!(!d.has_guest_agent_channel);
    let xvda = d.disk("xvda").expect("xvda");
    assert_eq!(xvda.driver_name.as_deref(), Some("phy"));
    assert_eq!(xvda.format, None);
    assert_eq!(xvda.bus.as_deref(), Some("xen"));
    assert_eq!(
        xvda.source,
        DiskSource::Block {
            dev: "/dev/vg_xen/mail-root".into()
        }
    );
    assert_eq!(
        xvda.backend(),
        Backend::Lvm {
            vg: "vg_xen".into(),
            lv: "mail-root".into()
        }
    );
    let xvdb = d.disk("xvdb").expect("xvdb");
    assert_eq!(xvdb.driver_name.as_deref(), Some("tap"));
    assert_eq!(xvdb.format.as_deref(), Some("aio"));
    assert_eq!(xvdb.backend(), Backend::RawFile);
    assert_eq!(d.disk("xvdc").expect("xvdc").backend(), Backend::QcowFile);
    assert_eq!(
        d.disk("xvdd").expect("xvdd").backend(),
        Backend::Lvm {
            vg: "vg_xen".into(),
            lv: "mail-swap".into()
        }
    );
    assert!(d.disks.iter().all(|x| x.is_backup_candidate().is_ok()));
    assert_eq!(d.interfaces[0].mac.as_deref(), Some("00:16:3e:5d:c7:9e"));
}

#[test]
fn xen_hvm() {
    let d = parse_domain(&fixture("xen-hvm.xml")).expect("parse");
    assert_eq!(d.kind, "xen");
    assert_eq!(d.id, None);
    assert_eq!(d.os_type.as_deref(), Some("hvm"));
    let hda = d.disk("hda").expect("hda");
    assert_eq!(hda.driver_name.as_deref(), Some("qdisk"));
    assert_eq!(hda.backend(), Backend::QcowFile);
    let hdb = d.disk("hdb").expect("hdb");
    assert_eq!(hdb.driver_name.as_deref(), Some("phy"));
    assert_eq!(
        hdb.backend(),
        Backend::Lvm {
            vg: "vg_xen".into(),
            lv: "win2019-data".into()
        }
    );
    let xvdc = d.disk("xvdc").expect("xvdc");
    assert_eq!(xvdc.driver_name.as_deref(), Some("file"));
    assert_eq!(xvdc.backend(), Backend::RawFile);
    assert_eq!(
        d.disk("hdc").expect("hdc").is_backup_candidate(),
        Err(SkipReason::Cdrom)
    );
    assert_eq!(
        d.disk("fda").expect("fda").is_backup_candidate(),
        Err(SkipReason::Floppy)
    );
}

#[test]
fn rbd_with_auth() {
    let d = parse_domain(&fixture("rbd-auth.xml")).expect("parse");
    let vda = d.disk("vda").expect("vda");
    assert_eq!(
        vda.source,
        DiskSource::Network {
            protocol: "rbd".into(),
            name: Some("vms/db-ceph-root".into()),
            hosts: ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
                .iter()
                .map(|h| NetHost {
                    name: Some((*h).into()),
                    port: Some("6789".into())
                })
                .collect(),
            auth: Some(DiskAuth {
                username: "libvirt".into(),
                secret_type: Some("ceph".into()),
                secret_uuid: Some("b4f9b1f0-5a9e-4a41-9d1d-2f4f5f1d3c77".into()),
                secret_usage: None,
            }),
        }
    );
    assert_eq!(
        vda.backend(),
        Backend::Rbd {
            pool: "vms".into(),
            image: "db-ceph-root".into()
        }
    );
    // Legacy <auth> placement directly in <disk>, and a namespace in the name.
    let vdb = d.disk("vdb").expect("vdb");
    match &vdb.source {
        DiskSource::Network { auth, hosts, .. } => {
            let auth = auth.as_ref().expect("auth");
            assert_eq!(auth.username, "admin");
            assert_eq!(auth.secret_usage.as_deref(), Some("client.admin secret"));
            assert_eq!(hosts[0].port, None);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        vdb.backend(),
        Backend::Rbd {
            pool: "fast".into(),
            image: "ns1/db-ceph-wal".into()
        }
    );
    let vdc = d.disk("vdc").expect("vdc");
    assert_eq!(vdc.backend(), Backend::Other);
    let vdd = d.disk("vdd").expect("vdd");
    assert_eq!(
        vdd.source,
        DiskSource::Volume {
            pool: "default".into(),
            volume: "db-ceph-tmp.qcow2".into()
        }
    );
    assert_eq!(vdd.backend(), Backend::Other);
}

#[test]
fn lvm_block() {
    let d = parse_domain(&fixture("lvm-block.xml")).expect("parse");
    assert_eq!(
        d.nvram.as_deref(),
        Some("/var/lib/libvirt/qemu/nvram/app-lvm_VARS.fd")
    );
    assert_eq!(
        d.disk("vda").expect("vda").backend(),
        Backend::Lvm {
            vg: "vg0".into(),
            lv: "app-lvm-root".into()
        }
    );
    assert_eq!(
        d.disk("vdb").expect("vdb").backend(),
        Backend::Lvm {
            vg: "vg-data".into(),
            lv: "app-lvm-db".into()
        }
    );
    assert_eq!(d.disk("vdc").expect("vdc").backend(), Backend::Block);
    let sda = d.disk("sda").expect("sda");
    assert_eq!(sda.device, DiskDevice::Lun);
    assert_eq!(sda.backend(), Backend::Block);
    assert_eq!(d.interfaces[0].kind, "direct");
}

#[test]
fn unknown_elements_comments_namespaces() {
    let d = parse_domain(&fixture("unknown-elements.xml")).expect("parse");
    assert_eq!(d.name, "R&D \"lab\" <1> – ünïcödé");
    assert_eq!(d.uuid.as_deref(), Some("9c2a4d7e1b3f4a5c8d6e7f8091a2b3c4"));
    // <disk> inside <metadata> (another namespace) is not a device.
    assert_eq!(d.disks.len(), 2);
    let vda = d.disk("vda").expect("vda");
    assert_eq!(
        vda.source,
        DiskSource::File {
            path: "/var/lib/libvirt/images/r&d.qcow2".into()
        }
    );
    assert_eq!(d.interfaces.len(), 2);
    assert_eq!(d.interfaces[1].mac, None);
}

#[test]
fn malformed_xml_reports_position() {
    let xml = "<domain type='kvm'>\n  <name>x</name>\n  <devices>\n    <disk type='file'>\n  </devices>\n</domain>\n";
    match parse_domain(xml) {
        Err(XmlError::Syntax { line, column, .. }) => assert_eq!((line, column), (5, 3)),
        other => panic!("unexpected {other:?}"),
    }
    let err =
        parse_domain("<domain>\n  <name a='1' a='2'>x</name></domain>").expect_err("dup attr");
    assert!(matches!(err, XmlError::Syntax { line: 2, .. }), "{err}");
    let err = parse_domain("<domain><name>x</name>").expect_err("eof");
    assert!(err.to_string().contains("not closed"), "{err}");
    let err = parse_domain("<domain><name>a &bogus; b</name></domain>").expect_err("entity");
    assert!(err.to_string().contains("bogus"), "{err}");
    assert!(matches!(
        parse_domain("<network><name>x</name></network>"),
        Err(XmlError::NotADomain { .. })
    ));
    assert!(matches!(
        parse_domain("<domain type='kvm'><uuid>x</uuid></domain>"),
        Err(XmlError::Missing { .. })
    ));
    let err = parse_domain(
        "<domain><name>x</name><devices><disk device='tape'><target dev='a'/></disk></devices></domain>",
    )
    .expect_err("device");
    assert!(matches!(err, XmlError::Invalid { .. }), "{err}");
    let err = parse_domain("<domain><name>x</name><devices><disk/></devices></domain>")
        .expect_err("target");
    assert!(err.to_string().contains("target"), "{err}");
}

#[test]
fn captured_fixtures_parse() {
    // Output captured from this machine's libvirt, when present.
    let dir = format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fixtures dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if name.starts_with("captured-dumpxml") {
            let xml = std::fs::read_to_string(&path).expect("read");
            let d = parse_domain(&xml).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(d.name.starts_with("vkt-libvirt-fixture"), "{name}");
            assert!(!d.disks.is_empty());
            n += 1;
        }
    }
    eprintln!("{n} captured dumpxml fixtures parsed");
}
