//! The constant scripts, run here against a temporary job directory tree.

use std::process::Command;

use virtkeep_libvirt::sh;
use virtkeep_ssh::RemoteCommand;

fn run(c: &RemoteCommand) -> (i32, String) {
    let out = Command::new("sh")
        .args(["-c", &c.render()])
        .output()
        .expect("sh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn rendered() {
    assert_eq!(sh::noop().render(), "true");
    assert_eq!(
        sh::command_path("-x").render(),
        r#"sh -c 'command -v "$1"' sh -x"#
    );
    assert_eq!(
        sh::hook("echo $VIRTKEEP_VM", &[("VIRTKEEP_VM", "a b")]).render(),
        "VIRTKEEP_VM='a b' sh -c 'echo $VIRTKEEP_VM'"
    );
    let holds = sh::list_holds("/run/virtkeep/jobs", "u'1").render();
    assert!(holds.starts_with("sh -c 'for f in"), "{holds}");
    assert!(
        holds.ends_with(r"' sh /run/virtkeep/jobs 'u'\''1'"),
        "{holds}"
    );
}

#[test]
fn scripts_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let jobs = dir.path().join("jobs");
    let jobs_s = jobs.to_str().expect("utf8");
    let uuid = "6b1c1e0e-0000-4c4e-9d43-0a1b2c3d4e5f";
    assert_eq!(run(&sh::has_job_dirs(jobs_s, uuid)).0, 1);
    assert_eq!(run(&sh::list_holds(jobs_s, uuid)), (0, String::new()));
    let job = jobs.join(format!("{uuid}-20260101T000000Z-1"));
    std::fs::create_dir_all(&job).expect("mkdir");
    std::fs::create_dir_all(jobs.join("other-uuid-1")).expect("mkdir");
    std::fs::write(jobs.join("other-uuid-1/held-suspend"), b"").expect("write");
    assert_eq!(run(&sh::has_job_dirs(jobs_s, uuid)).0, 0);
    assert_eq!(run(&sh::has_started_paused_job(jobs_s, uuid)).0, 1);
    std::fs::write(job.join("started-paused"), b"").expect("write");
    assert_eq!(run(&sh::has_started_paused_job(jobs_s, uuid)).0, 0);
    std::fs::write(job.join("held-fsfreeze"), b"").expect("write");
    assert_eq!(
        run(&sh::list_holds(jobs_s, uuid)),
        (0, format!("{}\theld-fsfreeze\n", job.display()))
    );
    let restore = jobs.join("restore-1");
    std::fs::create_dir_all(&restore).expect("mkdir");
    std::fs::write(restore.join("lock"), b"host\tvm\n").expect("write");
    assert_eq!(
        run(&sh::list_restore_jobs(jobs_s)),
        (0, format!("{}\thostvm\n", restore.display()))
    );
    assert_eq!(run(&sh::command_path("sh")).0, 0);
    assert_ne!(run(&sh::command_path("vkt-no-such-program")).0, 0);
    assert_eq!(
        run(&sh::hook(
            "printf %s \"$VIRTKEEP_VM\"",
            &[("VIRTKEEP_VM", "it's")]
        )),
        (0, "it's".to_string())
    );
}

#[test]
fn resolve_and_classify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = std::fs::canonicalize(dir.path()).expect("canon");
    let f = real.join("-f");
    std::fs::write(&f, b"x").expect("write");
    std::os::unix::fs::symlink(&f, real.join("l")).expect("symlink");
    let f_s = f.to_str().expect("utf8");
    assert_eq!(
        run(&sh::resolve_and_classify(f_s)),
        (0, format!("{f_s}\nfile\n"))
    );
    let l = real.join("l");
    assert_eq!(
        run(&sh::resolve_and_classify(l.to_str().expect("utf8"))),
        (0, format!("{f_s}\nsymlink\n"))
    );
    let m = real.join("m");
    assert_eq!(
        run(&sh::resolve_and_classify(m.to_str().expect("utf8"))).1,
        format!("{}\nmissing\n", m.display())
    );
    assert_eq!(
        run(&sh::resolve_and_classify(real.to_str().expect("utf8"))).1,
        format!("{}\nother\n", real.display())
    );
    let out = run(&sh::resolve_and_classify(f_s)).1;
    let (resolved, kind) = sh::parse_resolve_and_classify(&out);
    assert_eq!((resolved, kind), (f_s, sh::PathKind::File));
    for (out, want) in [
        ("/a\nsymlink\n", sh::PathKind::Symlink),
        ("/a\nmissing\n", sh::PathKind::Missing),
        ("/a\nother\n", sh::PathKind::Other),
        ("/a\n", sh::PathKind::Other),
        ("", sh::PathKind::Other),
    ] {
        assert_eq!(sh::parse_resolve_and_classify(out).1, want, "{out:?}");
    }
}

#[test]
fn installation_key_is_stable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("caps");
    let c = sh::installation_key_and_cache(cache.to_str().expect("utf8"));
    let (_, first) = run(&c);
    let key = first.lines().next().expect("key").to_string();
    assert!(!key.trim().is_empty());
    std::fs::write(&cache, format!("{key}\tyes\n")).expect("write");
    assert_eq!(run(&c).1, format!("{key}\n{key}\tyes\n"));
}
