//! Property test: whatever the string, `sh -c "printf %s <quote(s)>"` prints it back.

use std::process::Command;

use proptest::prelude::*;
use virtkeep_ssh::{RemoteCommand, quote};

fn sh_roundtrip(line: &str) -> Vec<u8> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(line)
        .output()
        .expect("run sh");
    assert!(out.status.success(), "sh failed for {line:?}: {:?}", out);
    out.stdout
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn quoted_word_survives_the_shell(s in any::<String>().prop_filter("no NUL", |s| !s.contains('\0'))) {
        let line = format!("printf %s {}", quote(&s));
        prop_assert_eq!(sh_roundtrip(&line), s.as_bytes());
    }

    #[test]
    fn shell_metacharacters_survive(s in "[ -~\n\t'\"`$\\\\()*?\\[\\]{};&|<>!#~=üß€]{0,40}") {
        let cmd = RemoteCommand::new("printf").arg("%s").arg(&s);
        prop_assert_eq!(sh_roundtrip(&cmd.render()), s.as_bytes());
        // The sudo wrapping quotes the line a second time; `sh -c <quoted line>`
        // must still give the same bytes.
        let wrapped = format!("sh -c {}", quote(&cmd.render()));
        prop_assert_eq!(sh_roundtrip(&wrapped), s.as_bytes());
    }
}

#[test]
fn hostile_argument_is_inert() {
    let marker = format!("/tmp/vkx-quote-{}", std::process::id());
    let hostile = format!("it's $(touch {marker}); \"quoted\" `id` ü\nline2 *");
    let cmd = RemoteCommand::new("printf").arg("%s").arg(&hostile);
    assert_eq!(sh_roundtrip(&cmd.render()), hostile.as_bytes());
    assert!(!std::path::Path::new(&marker).exists());
}
