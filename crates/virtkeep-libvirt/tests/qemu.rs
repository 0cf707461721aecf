//! `qemu-img` and `qemu-nbd` builders (exactly as the remote shell gets them; run
//! against this machine's QEMU 7.2) and parsers (on captured output).

use virtkeep_libvirt::qemu_img::{self, *};
use virtkeep_libvirt::{ParseError, escape_commas, qemu_nbd};

fn captured(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/captured/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn qemu_img() {
    assert_eq!(
        qemu_img::info_json("/var/lib/x.qcow2", Some("qcow2"), true).render(),
        "qemu-img info '--output=json' -f qcow2 -U /var/lib/x.qcow2"
    );
    assert_eq!(
        qemu_img::info_json("-x:y", None, false).render(),
        "qemu-img info '--output=json' ./-x:y"
    );
    assert_eq!(
        qemu_img::create_qcow2("/r/a b.qcow2", 1 << 30, None).render(),
        "qemu-img create -q -f qcow2 '/r/a b.qcow2' 1073741824"
    );
    assert_eq!(
        qemu_img::create_qcow2("/r/o.qcow2", 512, Some(("/r/base.raw", "raw"))).render(),
        "qemu-img create -q -f qcow2 -b /r/base.raw -F raw /r/o.qcow2 512"
    );
    assert_eq!(
        qemu_img::create_overlay("/r/o.vk", "/r/base.qcow2", "qcow2").render(),
        "qemu-img create -q -f qcow2 -b /r/base.qcow2 -F qcow2 /r/o.vk"
    );
    assert_eq!(
        qemu_img::create_raw("/r/d.raw", 4096).render(),
        "qemu-img create -q -f raw /r/d.raw 4096"
    );
    assert_eq!(
        qemu_img::map_json("/r/d", Some("raw"), true).render(),
        "qemu-img map '--output=json' -f raw -U /r/d"
    );
    assert_eq!(
        qemu_img::commit("/r/o.vk").render(),
        "qemu-img commit -q -f qcow2 /r/o.vk"
    );
}

#[test]
fn qemu_nbd_image_opts_escape_commas() {
    let opts = qemu_nbd::image_opts("qcow2", "/srv/vm,1/disk, a.qcow2", false, true);
    assert_eq!(
        opts,
        "driver=qcow2,force-share=on,file.driver=file,file.filename=/srv/vm,,1/disk,, a.qcow2"
    );
    assert_eq!(
        qemu_nbd::image_opts("raw", "/dev/vg0/lv", true, false),
        "driver=raw,file.driver=host_device,file.filename=/dev/vg0/lv"
    );
    assert_eq!(
        qemu_nbd::export_readonly(&opts, "/tmp/vk.x/nbd.sock", "/tmp/vk.x/nbd.pid").render(),
        "qemu-nbd -r --fork --persistent '--shared=8' '--socket=/tmp/vk.x/nbd.sock' \
         '--pid-file=/tmp/vk.x/nbd.pid' --image-opts \
         'driver=qcow2,force-share=on,file.driver=file,file.filename=/srv/vm,,1/disk,, a.qcow2'"
    );
    assert_eq!(
        qemu_nbd::export_writable("/r/x.raw", "raw", false, false, "/s", "/p").render(),
        "qemu-nbd --fork --persistent '--shared=8' '--discard=unmap' '--socket=/s' '--pid-file=/p' \
         --image-opts 'driver=raw,file.driver=file,file.filename=/r/x.raw'"
    );
    assert_eq!(
        qemu_nbd::export_writable("/r/x.raw", "raw", false, true, "/s", "/p").render(),
        "qemu-nbd --fork --persistent '--shared=8' '--discard=unmap' '--cache=none' '--socket=/s' \
         '--pid-file=/p' --image-opts 'driver=raw,file.driver=file,file.filename=/r/x.raw'"
    );
    assert_eq!(escape_commas("a,,b,"), "a,,,,b,,");
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

#[test]
fn qemu_nbd_tcp_and_stop_scripts() {
    assert_eq!(
        qemu_nbd::export_readonly_tcp(
            "driver=raw,file.driver=file,file.filename=/r/x",
            "10.0.0.1",
            10809,
            "/j/0.pid"
        )
        .render(),
        "qemu-nbd -r --fork --persistent '--shared=8' '--bind=10.0.0.1' '--port=10809' \
         '--pid-file=/j/0.pid' --image-opts 'driver=raw,file.driver=file,file.filename=/r/x'"
    );
    for c in [
        qemu_nbd::stop("/j/0.pid"),
        qemu_nbd::kill_exports_in("/j"),
        qemu_nbd::kill_job_exports("/run/virtkeep/jobs", "u"),
    ] {
        assert!(c.render().starts_with("sh -c '"), "{}", c.render());
    }
}

fn sh_ok(c: &virtkeep_ssh::RemoteCommand) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &c.render()])
        .status()
        .expect("sh")
        .success()
}

fn pid_in(file: &std::path::Path) -> u32 {
    std::fs::read_to_string(file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

fn gone(pid: u32) -> bool {
    // gone, or a zombie waiting for its reaper
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Err(_) => true,
        Ok(s) => s
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z')),
    }
}

/// Real qemu-nbd exports on this machine: started by the builders, stopped by the
/// stop scripts (skipped without qemu-nbd).
#[test]
fn qemu_nbd_exports_start_and_stop() {
    if !sh_ok(&virtkeep_libvirt::sh::command_path("qemu-nbd")) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("d, 1.raw");
    let img = img.to_str().expect("utf8");
    assert!(sh_ok(&qemu_img::create_raw(img, 1 << 20)));
    let jobs = dir.path().join("jobs");
    let job = jobs.join("u-1");
    std::fs::create_dir_all(&job).expect("mkdir");
    let start = |i: usize| {
        let sock = job.join(format!("{i}.sock"));
        let pid = job.join(format!("{i}.pid"));
        let opts = qemu_nbd::image_opts("raw", img, false, true);
        let c = qemu_nbd::export_readonly(
            &opts,
            sock.to_str().expect("utf8"),
            pid.to_str().expect("utf8"),
        );
        assert!(sh_ok(&c), "{}", c.render());
        pid
    };
    let p0 = start(0);
    let pid0 = pid_in(&p0);
    assert!(sh_ok(&qemu_nbd::stop(p0.to_str().expect("utf8"))));
    assert!(gone(pid0));
    let pid1 = pid_in(&start(1));
    assert!(sh_ok(&qemu_nbd::kill_exports_in(
        job.to_str().expect("utf8")
    )));
    assert!(gone(pid1));
    let pid2 = pid_in(&start(2));
    // a pid file naming another program is left alone
    let mut sleeper = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    std::fs::write(job.join("9.pid"), sleeper.id().to_string()).expect("write");
    assert!(sh_ok(&qemu_nbd::kill_job_exports(
        jobs.to_str().expect("utf8"),
        "u"
    )));
    for _ in 0..50 {
        if gone(pid2) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(gone(pid2));
    assert!(!job.exists());
    assert!(sleeper.try_wait().expect("wait").is_none());
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// `create_new_image` and `create_nbd_overlay` never write over what is at the path: an
/// existing file keeps its bytes, a dangling symlink is not followed, and no temporary
/// is left; where nothing is, the image is made (skipped without qemu-img).
#[test]
fn image_creation_is_exclusive() {
    if !sh_ok(&virtkeep_libvirt::sh::command_path("qemu-img")) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let at = |n: &str| dir.path().join(n).to_str().expect("utf8").to_string();
    std::fs::write(at("taken"), b"not yours").expect("write");
    assert!(!sh_ok(&qemu_img::create_new_image(
        &at("taken"),
        "raw",
        1 << 20
    )));
    let overlay = qemu_img::create_nbd_overlay(&at("taken"), 1 << 20, "/run/x.sock", "vda")
        .expect("plain names");
    assert!(!sh_ok(&overlay));
    assert_eq!(std::fs::read(at("taken")).expect("read"), b"not yours");
    std::os::unix::fs::symlink(at("target"), at("link")).expect("symlink");
    assert!(!sh_ok(&qemu_img::create_new_image(
        &at("link"),
        "qcow2",
        1 << 20
    )));
    assert!(!dir.path().join("target").exists(), "followed the symlink");
    assert!(sh_ok(&qemu_img::create_new_image(
        &at("new"),
        "raw",
        1 << 20
    )));
    assert_eq!(std::fs::metadata(at("new")).expect("new").len(), 1 << 20);
    // A name of NAME_MAX bytes still gets its (fixed-length) temporary.
    let long = "n".repeat(255);
    assert!(sh_ok(&qemu_img::create_new_image(
        &at(&long),
        "raw",
        1 << 20
    )));
    std::fs::remove_file(at(&long)).expect("long name made");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["link", "new", "taken"], "temporaries left");
}
