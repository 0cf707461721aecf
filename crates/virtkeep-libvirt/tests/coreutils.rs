//! Files, processes and locks: builders (exactly as the remote shell gets them, and
//! run on this machine) and parsers.

use virtkeep_libvirt::coreutils::{self, *};
use virtkeep_libvirt::qemu_img;

fn captured(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/captured/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn files_and_locks() {
    assert_eq!(
        coreutils::chown("libvirt-qemu:kvm", "/r/a b").render(),
        "chown -- libvirt-qemu:kvm '/r/a b'"
    );
    assert_eq!(coreutils::rm_f("-rf /").render(), "rm -f -- '-rf /'");
    assert_eq!(
        coreutils::stat("/r/x").render(),
        "stat -L -c '%s\t%U\t%G\t%a\t%F' -- /r/x"
    );
    assert_eq!(
        coreutils::mkdir_p("/r/new dir").render(),
        "mkdir -p -- '/r/new dir'"
    );
    assert_eq!(
        coreutils::df_avail("/var/lib/libvirt/images").render(),
        "df -B1 '--output=avail' -- /var/lib/libvirt/images"
    );
    assert_eq!(coreutils::rm_rf("-x").render(), "rm -rf -- -x");
    assert_eq!(
        mkdir_p_mode("/run/virtkeep/locks", 0o700).render(),
        "mkdir -p -m 0700 -- /run/virtkeep/locks"
    );
    assert_eq!(chmod(0o600, "-x").render(), "chmod 0600 -- -x");
    assert_eq!(
        chown_like("/r/disk", "-o").render(),
        "chown '--reference=/r/disk' -- -o"
    );
    assert_eq!(
        chmod_like("/r/disk", "-o").render(),
        "chmod '--reference=/r/disk' -- -o"
    );
    assert_eq!(cp("-a", "/b").render(), "cp -- -a /b");
    assert_eq!(mv_replace("-a", "/b").render(), "mv -f -T -- -a /b");
    assert_eq!(cat("/r/x y").render(), "cat -- '/r/x y'");
    assert_eq!(write_stdin_to("/r/x y").render(), "cat > '/r/x y'");
    assert_eq!(exists("-e").render(), "test -e -e");
    assert_eq!(is_file("/r/x").render(), "test -f /r/x");
    assert_eq!(
        realpath_all(["/a", "-b"]).render(),
        "realpath -m -z -- /a -b"
    );
    assert_eq!(
        list_files("-r").render(),
        "find ./-r -maxdepth 1 -type f -print0"
    );
    assert_eq!(
        blockdev_size("/dev/vg0/a").render(),
        "blockdev --getsize64 /dev/vg0/a"
    );
    assert_eq!(blockdev_size("-x").render(), "blockdev --getsize64 ./-x");
    assert_eq!(
        dd_read("/dev/vg0/a b", 4 << 20).render(),
        "dd 'if=/dev/vg0/a b' 'bs=4194304' 'iflag=fullblock' 'status=none'"
    );
    assert_eq!(user_exists("-qemu").render(), "id -u -- -qemu");
    assert_eq!(primary_group("qemu").render(), "id -gn -- qemu");
    assert_eq!(pgrep_exact("qemu-nbd").render(), "pgrep -a -x -- qemu-nbd");
    assert_eq!(kill(Signal::Term, 42).render(), "kill -TERM 42");
    assert_eq!(kill(Signal::Kill, 42).render(), "kill -KILL 42");
    assert_eq!(process_alive(42).render(), "grep -q . /proc/42/cmdline");
    assert_eq!(
        coreutils::flock_hold("/run/vk/a.lock", Some(10)).render(),
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
        let out = sh(&qemu_img::create_qcow2(path, 1 << 20, None));
        assert!(out.status.success(), "{out:?}");
        let out = sh(&qemu_img::info_json(path, Some("qcow2"), true));
        assert!(out.status.success(), "{out:?}");
        let info = qemu_img::parse_qemu_img_info(std::str::from_utf8(&out.stdout).expect("utf8"))
            .expect("parse");
        assert_eq!(info.virtual_size, 1 << 20);
        assert_eq!(info.format, "qcow2");
    }
    let out = sh(&coreutils::df_avail(dir.path().to_str().expect("utf8")));
    assert!(out.status.success());
    assert!(parse_df_avail(std::str::from_utf8(&out.stdout).expect("utf8")).expect("df") > 0);
    let f = dir.path().join("x y");
    std::fs::write(&f, b"12345").expect("write");
    let out = sh(&coreutils::stat(f.to_str().expect("utf8")));
    let st = parse_stat(std::str::from_utf8(&out.stdout).expect("utf8")).expect("stat");
    assert_eq!(st.size, 5);
    assert_eq!(st.file_type, "regular file");
    if have("flock") {
        let lock = dir.path().join("l");
        let lock = lock.to_str().expect("utf8");
        let hold = |wait| {
            let mut c = std::process::Command::new("sh")
                .args(["-c", &flock_hold(lock, wait).render()])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn");
            let mut buf = [0u8; 7];
            let got = std::io::Read::read_exact(c.stdout.as_mut().expect("stdout"), &mut buf);
            (c, got.map(|_| buf))
        };
        let (mut holder, got) = hold(None);
        assert_eq!(&got.expect("read"), b"locked\n");
        // Held lock → status 75, at once or after the wait.
        for wait in [None, Some(1)] {
            let (mut other, got) = hold(wait);
            assert!(got.is_err());
            assert_eq!(
                other.wait().expect("wait").code(),
                Some(FLOCK_CONFLICT_STATUS as i32)
            );
        }
        drop(holder.stdin.take());
        assert!(holder.wait().expect("wait").success());
        let (mut again, got) = hold(None);
        assert_eq!(&got.expect("read"), b"locked\n");
        drop(again.stdin.take());
        assert!(again.wait().expect("wait").success());
    }
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

fn run(c: &virtkeep_ssh::RemoteCommand) -> (bool, Vec<u8>) {
    let out = std::process::Command::new("sh")
        .args(["-c", &c.render()])
        .output()
        .expect("sh");
    (out.status.success(), out.stdout)
}

/// The file builders run on this machine, on names that look like options.
#[test]
fn file_builders_run_locally() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n).to_str().expect("utf8").to_string();
    let mode = |n: &str| {
        std::fs::metadata(dir.path().join(n))
            .expect("meta")
            .permissions()
            .mode()
            & 0o7777
    };
    assert!(run(&mkdir_p_mode(&p("-d/e"), 0o710)).0);
    assert_eq!(mode("-d/e"), 0o710);
    let mut w = std::process::Command::new("sh")
        .args(["-c", &write_stdin_to(&p("-f")).render()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::io::Write::write_all(w.stdin.as_mut().expect("stdin"), b"hello").expect("write");
    drop(w.stdin.take());
    assert!(w.wait().expect("wait").success());
    assert_eq!(run(&cat(&p("-f"))), (true, b"hello".to_vec()));
    assert!(run(&exists(&p("-f"))).0 && run(&is_file(&p("-f"))).0);
    assert!(run(&exists(&p("-d"))).0 && !run(&is_file(&p("-d"))).0);
    assert!(!run(&exists(&p("-nothing"))).0);
    assert!(run(&chmod(0o640, &p("-f"))).0);
    assert_eq!(mode("-f"), 0o640);
    assert!(run(&cp(&p("-f"), &p("-g"))).0);
    assert!(run(&chmod_like(&p("-d/e"), &p("-g"))).0);
    assert_eq!(mode("-g"), 0o710);
    assert!(run(&chown_like(&p("-f"), &p("-g"))).0);
    assert!(run(&mv_replace(&p("-g"), &p("-f"))).0);
    assert!(!dir.path().join("-g").exists());
    assert_eq!(mode("-f"), 0o710);
    let (ok, out) = run(&dd_read(&p("-f"), 2));
    assert!(ok);
    assert_eq!(out, b"hello");
    std::os::unix::fs::symlink(dir.path().join("-f"), dir.path().join("l")).expect("symlink");
    let (ok, out) = run(&realpath_all([p("l").as_str(), p("-x/../-f").as_str()]));
    assert!(ok);
    let real = std::fs::canonicalize(dir.path().join("-f")).expect("canon");
    let real = real.to_str().expect("utf8");
    assert_eq!(
        String::from_utf8(out).expect("utf8"),
        format!("{real}\0{real}\0")
    );
    let (ok, out) = run(&list_files(&p("")));
    assert!(ok);
    let mut files: Vec<String> = out
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    files.sort();
    assert_eq!(files, vec![p("-f")]);
    assert!(run(&rm_f(&p("-f"))).0 && !dir.path().join("-f").exists());
    assert!(run(&rm_f(&p("-f"))).0);
    assert!(run(&rm_rf(&p("-d"))).0 && !dir.path().join("-d").exists());
    assert!(run(&user_exists("root")).0);
    assert!(!run(&user_exists("vkt-no-such-user")).0);
    assert_eq!(run(&primary_group("root")), (true, b"root\n".to_vec()));
    assert!(run(&process_alive(std::process::id())).0);
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    assert!(run(&kill(Signal::Term, child.id())).0);
    assert!(!child.wait().expect("wait").success());
}

#[test]
fn process_matching() {
    let ps = parse_pgrep(
        "123 qemu-nbd -r --image-opts driver=raw,file.driver=host_device,file.filename=/dev/vg0/a-vksnap-J\n45 dd if=/dev/vg0/a-vksnap-J2 bs=4M\nbad line\n",
    );
    assert_eq!(ps.len(), 2);
    assert!(mentions_path(&ps[0].1, "/dev/vg0/a-vksnap-J"));
    assert!(!mentions_path(&ps[1].1, "/dev/vg0/a-vksnap-J"));
    assert!(mentions_path("dd if=/dev/vg0/x", "/dev/vg0/x"));
    assert!(!mentions_path("dd if=/dev/vg0/xy", "/dev/vg0/x"));
    assert!(!mentions_path("dd if=/dev/vg0/x", "/dev/vg0/"));
}
