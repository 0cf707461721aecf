//! Shell completions and man pages.

use std::process::Command;

use crate::harness::Node;

#[test]
fn completions_parse_and_man_pages_render() {
    let node = Node::new();
    let dir = node.dir.path();
    for shell in ["bash", "zsh", "fish"] {
        let script = node.ok(&["completions", shell]);
        for word in ["forget", "snapshots", "password-file", "change-passphrase"] {
            assert!(script.contains(word), "{shell} script lacks {word}");
        }
        if shell == "bash" {
            let file = dir.join("virtkeep.bash");
            std::fs::write(&file, &script).expect("write");
            let st = Command::new("bash")
                .arg("-n")
                .arg(&file)
                .status()
                .expect("bash");
            assert!(st.success(), "bash -n fails on the script");
        }
    }
    let out = node.run(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));

    // Works with a broken configuration, too.
    std::fs::write(node.config(), "this is [not toml").expect("write");
    let man = dir.join("man/man1");
    node.ok(&["man", &man.display().to_string()]);
    for page in [
        "virtkeep.1",
        "virtkeep-backup.1",
        "virtkeep-repo-init.1",
        "virtkeep-forget.1",
    ] {
        assert!(man.join(page).is_file(), "{page} missing");
    }
    let out = Command::new("man")
        .arg("-l")
        .arg(man.join("virtkeep-backup.1"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .expect("man");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("--exclude-disk"), "{text}");
}
