//! Remote command lines: the one quoting function and the [`RemoteCommand`] builder.
//!
//! SSH has no argv: the remote sshd hands one string to the user's shell. Every word
//! that comes from input therefore passes through [`quote`], and shell operators
//! (`&&`, `|`, `>`, `<`, `2>&1`) only exist as builder methods that emit fixed literals.

use std::fmt;

/// Quote `arg` as one POSIX shell word.
///
/// Words made only of characters that no POSIX shell treats specially are returned as
/// they are (for readable logs); everything else is wrapped in single quotes with each
/// `'` written as `'\''`. Inside single quotes no character is special, so this is safe
/// for any string without NUL: newlines, `$()`, backticks, globs, unicode. The empty
/// string becomes `''`.
pub fn quote(arg: &str) -> String {
    if arg.is_empty() {
        return "''".to_owned();
    }
    if arg.bytes().all(is_plain) {
        return arg.to_owned();
    }
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('\'');
    for c in arg.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Bytes that need no quoting anywhere in a word. `=` is excluded (a leading `NAME=`
/// word is an assignment), `~` too (tilde expansion), and so is every glob character.
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'_' | b'-' | b'.' | b'/' | b':' | b',' | b'+' | b'@' | b'%'
        )
}

fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Redirect {
    StdoutTo(String),
    StdinFrom(String),
    StderrToStdout,
}

impl Redirect {
    fn render(&self, out: &mut String) {
        match self {
            Redirect::StdoutTo(p) => {
                out.push_str(" > ");
                out.push_str(&quote(p));
            }
            Redirect::StdinFrom(p) => {
                out.push_str(" < ");
                out.push_str(&quote(p));
            }
            Redirect::StderrToStdout => out.push_str(" 2>&1"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AndThen,
    Pipe,
}

impl Op {
    fn literal(self) -> &'static str {
        match self {
            Op::AndThen => " && ",
            Op::Pipe => " | ",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Simple {
        env: Vec<(String, String)>,
        /// A trusted constant snippet rendered verbatim in place of the program word.
        raw: Option<&'static str>,
        /// Program (unless `raw`) and arguments, unquoted; quoted at render time.
        words: Vec<String>,
    },
    Compound {
        op: Op,
        left: Box<RemoteCommand>,
        right: Box<RemoteCommand>,
    },
}

/// A remote command line, built so that no input can reach the shell unquoted.
///
/// ```
/// use virtkeep_ssh::RemoteCommand;
/// let cmd = RemoteCommand::new("virsh")
///     .env("LC_ALL", "C")
///     .args(["dumpxml", "it's a VM"])
///     .stderr_to_stdout();
/// assert_eq!(cmd.render(), r"LC_ALL=C virsh dumpxml 'it'\''s a VM' 2>&1");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteCommand {
    node: Node,
    redirects: Vec<Redirect>,
}

impl RemoteCommand {
    /// A simple command running `program` (quoted like any argument).
    pub fn new(program: impl AsRef<str>) -> RemoteCommand {
        RemoteCommand {
            node: Node::Simple {
                env: Vec::new(),
                raw: None,
                words: vec![program.as_ref().to_owned()],
            },
            redirects: Vec::new(),
        }
    }

    /// A constant shell snippet rendered verbatim (e.g. `"command -v qemu-img"` or
    /// `"cat /proc/meminfo"`). It takes `&'static str` so that only literals written
    /// in the source can reach this path, never runtime input. Arguments appended with
    /// [`arg`](Self::arg) are still quoted.
    pub fn raw_trusted(snippet: &'static str) -> RemoteCommand {
        RemoteCommand {
            node: Node::Simple {
                env: Vec::new(),
                raw: Some(snippet),
                words: Vec::new(),
            },
            redirects: Vec::new(),
        }
    }

    /// Append one argument (quoted). On a composed command (`and_then`/`pipe`) the
    /// argument goes to the last simple command.
    pub fn arg(mut self, arg: impl AsRef<str>) -> RemoteCommand {
        self.last_simple_mut_words().push(arg.as_ref().to_owned());
        self
    }

    /// Append several arguments (each quoted).
    pub fn args<I, S>(mut self, args: I) -> RemoteCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let words = self.last_simple_mut_words();
        words.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Set an environment variable for this command: rendered as a `K='v'` prefix when
    /// `K` is a shell identifier, otherwise as `env 'K=v'`. Both parts are quoted.
    /// On a composed command it applies to the first simple command.
    pub fn env(mut self, key: impl AsRef<str>, value: impl AsRef<str>) -> RemoteCommand {
        let pair = (key.as_ref().to_owned(), value.as_ref().to_owned());
        let mut cur = &mut self;
        loop {
            match &mut cur.node {
                Node::Simple { env, .. } => {
                    env.push(pair);
                    break;
                }
                Node::Compound { left, .. } => cur = left,
            }
        }
        self
    }

    /// `self && next`.
    pub fn and_then(self, next: RemoteCommand) -> RemoteCommand {
        RemoteCommand {
            node: Node::Compound {
                op: Op::AndThen,
                left: Box::new(self),
                right: Box::new(next),
            },
            redirects: Vec::new(),
        }
    }

    /// `self | next`.
    pub fn pipe(self, next: RemoteCommand) -> RemoteCommand {
        RemoteCommand {
            node: Node::Compound {
                op: Op::Pipe,
                left: Box::new(self),
                right: Box::new(next),
            },
            redirects: Vec::new(),
        }
    }

    /// `> path` (quoted). On a composed command the whole group is redirected.
    pub fn stdout_to(mut self, path: impl AsRef<str>) -> RemoteCommand {
        self.redirects
            .push(Redirect::StdoutTo(path.as_ref().to_owned()));
        self
    }

    /// `< path` (quoted).
    pub fn stdin_from(mut self, path: impl AsRef<str>) -> RemoteCommand {
        self.redirects
            .push(Redirect::StdinFrom(path.as_ref().to_owned()));
        self
    }

    /// `2>&1`.
    pub fn stderr_to_stdout(mut self) -> RemoteCommand {
        self.redirects.push(Redirect::StderrToStdout);
        self
    }

    /// The command line as the remote shell will see it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_into(&mut out);
        out
    }

    /// The whole line wrapped for sudo: `sudo -n -- sh -c '<line>'`. `-n` makes sudo
    /// fail instead of prompting for a password.
    pub fn render_with_sudo(&self) -> String {
        format!("sudo -n -- sh -c {}", quote(&self.render()))
    }

    fn last_simple_mut_words(&mut self) -> &mut Vec<String> {
        let mut cur = self;
        loop {
            match &mut cur.node {
                Node::Simple { words, .. } => return words,
                Node::Compound { right, .. } => cur = right,
            }
        }
    }

    fn render_into(&self, out: &mut String) {
        let compound = matches!(self.node, Node::Compound { .. });
        let group = compound && !self.redirects.is_empty();
        if group {
            out.push_str("{ ");
        }
        match &self.node {
            Node::Simple { env, raw, words } => {
                let mut first = true;
                let mut sep = |out: &mut String| {
                    if !first {
                        out.push(' ');
                    }
                    first = false;
                };
                for (k, v) in env {
                    sep(out);
                    if is_identifier(k) {
                        out.push_str(k);
                        out.push('=');
                        out.push_str(&quote(v));
                    } else {
                        out.push_str("env ");
                        out.push_str(&quote(&format!("{k}={v}")));
                    }
                }
                if let Some(raw) = raw {
                    sep(out);
                    out.push_str(raw);
                }
                for w in words {
                    sep(out);
                    out.push_str(&quote(w));
                }
            }
            Node::Compound { op, left, right } => {
                left.render_operand(*op, out);
                out.push_str(op.literal());
                right.render_operand(*op, out);
            }
        }
        if group {
            out.push_str("; }");
        }
        for r in &self.redirects {
            r.render(out);
        }
    }

    /// Render as the operand of `parent`: a compound of another operator (or a
    /// redirected compound, which renders its own braces) is grouped with `{ …; }`.
    fn render_operand(&self, parent: Op, out: &mut String) {
        match &self.node {
            Node::Compound { op, .. } if *op != parent && self.redirects.is_empty() => {
                out.push_str("{ ");
                self.render_into(out);
                out.push_str("; }");
            }
            _ => self.render_into(out),
        }
    }
}

impl fmt::Display for RemoteCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_basics() {
        assert_eq!(quote(""), "''");
        assert_eq!(quote("abc-1.2/x"), "abc-1.2/x");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("A=b"), "'A=b'");
        assert_eq!(quote("~root"), "'~root'");
        assert_eq!(quote("$(id)"), "'$(id)'");
        assert_eq!(quote("ü"), "'ü'");
    }

    #[test]
    fn builder_renders() {
        let c = RemoteCommand::new("qemu-img")
            .args(["info", "--output=json"])
            .arg("/var/lib/x y.qcow2");
        assert_eq!(
            c.render(),
            "qemu-img info '--output=json' '/var/lib/x y.qcow2'"
        );
        let c = RemoteCommand::new("a")
            .and_then(RemoteCommand::new("b").pipe(RemoteCommand::new("c")))
            .stdout_to("/tmp/o u");
        assert_eq!(c.render(), "{ a && { b | c; }; } > '/tmp/o u'");
        let c = RemoteCommand::new("a")
            .and_then(RemoteCommand::new("b"))
            .pipe(RemoteCommand::new("c"));
        assert_eq!(c.render(), "{ a && b; } | c");
        let c = RemoteCommand::new("a")
            .pipe(RemoteCommand::new("b"))
            .pipe(RemoteCommand::new("c").stdin_from("in"));
        assert_eq!(c.render(), "a | b | c < in");
        let c = RemoteCommand::raw_trusted("command -v")
            .arg("qemu-img")
            .env("PATH", "/usr/sbin:/usr/bin")
            .env("weird-key", "v");
        assert_eq!(
            c.render(),
            "PATH=/usr/sbin:/usr/bin env 'weird-key=v' command -v qemu-img"
        );
        assert_eq!(
            RemoteCommand::new("id").arg("-u").render_with_sudo(),
            "sudo -n -- sh -c 'id -u'"
        );
        assert_eq!(
            format!("{}", RemoteCommand::new("x").stderr_to_stdout()),
            "x 2>&1"
        );
    }
}
