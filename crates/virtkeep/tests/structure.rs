//! The code's shape, checked from its text (docs/architecture.md, "Rules of the shape"):
//! - no module of the engine or of virtkeep-ssh imports a module that imports it back;
//! - no function of the engine is longer than 120 lines;
//! - no `too_many_arguments` allow anywhere;
//! - no string comparison on storage backend names (`virtkeep_repo::Storage` is the type);
//! - no command line is built outside virtkeep-libvirt (the builders) and virtkeep-ssh (the
//!   quoting type itself);
//! - `restore --define` asks the target host what the definition needs (the emulator)
//!   before it writes a disk, so a refusal there loses nothing.
//!
//! It reads source files, not compiler output: the code is rustfmt-formatted (CI checks),
//! which makes a function's end the first `}` at its own indentation. Test modules
//! (`#[cfg(test)] mod …`) are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FN_LINES: usize = 120;

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crates/")
        .to_path_buf()
}

/// The non-test part of a source file.
fn source(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read source");
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|l| l.trim_start().starts_with("mod "))
        {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// A crate's modules: module path (`backup::cbt`, `` for the root) → file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut map = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).expect("under src");
        let mut parts: Vec<String> = rel
            .iter()
            .map(|s| s.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        if matches!(
            parts.last().map(String::as_str),
            Some("mod" | "lib" | "main")
        ) {
            parts.pop();
        }
        map.insert(parts.join("::"), f);
    }
    map
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands a `use` tree (`crate::{a::X, b::{c, d}}`) into whole paths.
fn expand_use(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or(tree).trim();
        let whole = match (prefix.is_empty(), path) {
            (_, "self") => prefix.to_string(),
            (true, _) => path.to_string(),
            (false, _) => format!("{prefix}::{path}"),
        };
        out.push(whole);
        return;
    };
    let head = tree[..open].trim().trim_end_matches("::");
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let prefix = match (prefix.is_empty(), head.is_empty()) {
        (true, _) => head.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}::{head}"),
    };
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                if !inner[start..i].trim().is_empty() {
                    expand_use(&prefix, &inner[start..i], out);
                }
                start = i + 1;
            }
            _ => {}
        }
    }
    if !inner[start..].trim().is_empty() {
        expand_use(&prefix, &inner[start..], out);
    }
}

/// Every path the file names: its `use` trees expanded, and `crate::…`/`super::…`/
/// `self::…`/`child::…` paths in code.
fn named_paths(text: &str, children: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        let t = t.strip_prefix("pub ").unwrap_or(t);
        let t = match t.strip_prefix("pub(") {
            Some(r) => r.split_once(") ").map_or(t, |(_, r)| r),
            None => t,
        };
        let Some(tree) = t.strip_prefix("use ") else {
            continue;
        };
        let mut tree = tree.to_string();
        while !tree.contains(';') {
            match lines.next() {
                Some(l) => tree.push_str(l),
                None => break,
            }
        }
        let end = tree.find(';').unwrap_or(tree.len());
        expand_use("", &tree[..end], &mut out);
    }
    let starts: Vec<String> = ["crate", "super", "self"]
        .iter()
        .map(|s| s.to_string())
        .chain(children.iter().cloned())
        .collect();
    for start in &starts {
        let pat = format!("{start}::");
        let mut from = 0;
        while let Some(i) = text[from..].find(&pat) {
            let at = from + i;
            from = at + pat.len();
            let before = text[..at].chars().last();
            if before.is_some_and(|c| is_ident(c) || c == ':') {
                continue;
            }
            let path: String = text[at..]
                .chars()
                .take_while(|&c| is_ident(c) || c == ':')
                .collect();
            out.push(path.trim_end_matches(':').to_string());
        }
    }
    out
}

/// The module a path names, given the module it is named from.
fn resolve(path: &str, from: &str, mods: &BTreeMap<String, PathBuf>) -> Option<String> {
    let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: Vec<&str> = if from.is_empty() {
        Vec::new()
    } else {
        from.split("::").collect()
    };
    match segs.first().copied() {
        Some("crate") => {
            base.clear();
            segs.remove(0);
        }
        Some("self") => {
            segs.remove(0);
        }
        Some("super") => {
            while segs.first() == Some(&"super") {
                base.pop();
                segs.remove(0);
            }
        }
        // A child module of `from` named without `self::`.
        Some(_) => {}
        None => return None,
    }
    let mut full: Vec<&str> = base;
    full.extend(segs);
    // The longest prefix that is a module of this crate.
    (0..=full.len())
        .rev()
        .map(|n| full[..n].join("::"))
        .find(|m| mods.contains_key(m))
}

/// File-level import edges of one crate (the crate root, a facade of `mod` lines and
/// re-exports, is left out: every module may name what it re-exports).
fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(src);
    let mut graph = BTreeMap::new();
    for (name, file) in &mods {
        if name.is_empty() {
            continue;
        }
        let text = source(file);
        let prefix = format!("{name}::");
        let children: Vec<String> = mods
            .keys()
            .filter_map(|m| m.strip_prefix(&prefix))
            .filter(|m| !m.contains("::"))
            .map(str::to_string)
            .collect();
        let edges: BTreeSet<String> = named_paths(&text, &children)
            .iter()
            .filter(|p| {
                let first = p.split("::").next().unwrap_or("");
                ["crate", "super", "self"].contains(&first) || children.iter().any(|c| c == first)
            })
            .filter_map(|p| resolve(p, name, &mods))
            .filter(|m| !m.is_empty() && m != name)
            .collect();
        graph.insert(name.clone(), edges);
    }
    graph
}

/// Modules that import each other, directly or through others: one line per cycle found.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut found = BTreeSet::new();
    for start in graph.keys() {
        // Depth-first search for a path back to `start`.
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if next == start {
                    let mut cycle = path.clone();
                    let min = (0..cycle.len()).min_by_key(|&i| &cycle[i]).unwrap_or(0);
                    cycle.rotate_left(min);
                    found.insert(cycle.join(" -> "));
                } else if seen.insert(next.clone()) {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push((next.clone(), p));
                }
            }
        }
    }
    found.into_iter().collect()
}

fn check_no_cycles(krate: &str) {
    let graph = import_graph(&crates_dir().join(krate).join("src"));
    assert!(
        graph.len() > 3,
        "{krate}: too few modules read, the reader is broken"
    );
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "{krate}: modules that import each other (file level):\n{}",
        found.join("\n")
    );
}

#[test]
fn engine_modules_form_no_cycle() {
    check_no_cycles("virtkeep-engine");
}

#[test]
fn ssh_modules_form_no_cycle() {
    check_no_cycles("virtkeep-ssh");
}

/// `(line, name, length)` of every function in `text`.
fn functions(text: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(at) = trimmed.find("fn ") else {
            continue;
        };
        let head = &trimmed[..at];
        let words_ok = head.split_whitespace().all(|w| {
            matches!(w, "pub" | "async" | "const" | "unsafe" | "extern") || w.starts_with("pub(")
        });
        if !words_ok || trimmed.starts_with("//") {
            continue;
        }
        let name: String = trimmed[at + 3..]
            .chars()
            .take_while(|&c| is_ident(c))
            .collect();
        if name.is_empty() {
            continue;
        }
        let indent = line.len() - trimmed.len();
        let close = format!("{}}}", " ".repeat(indent));
        // A declaration without a body ends with `;` before any `{` line.
        let mut end = None;
        for (j, l) in lines.iter().enumerate().skip(i) {
            if l.trim_end().ends_with(';') && !l.contains('{') && j < i + 40 && end.is_none() {
                let sig_done = lines[i..=j].iter().all(|s| !s.contains('{'));
                if sig_done && l.len() - l.trim_start().len() <= indent + 4 {
                    break;
                }
            }
            if j > i && l.trim_end() == close {
                end = Some(j);
                break;
            }
            if j == i && l.trim_end().ends_with('}') && l.contains('{') {
                end = Some(j);
                break;
            }
        }
        if let Some(end) = end {
            out.push((i + 1, name, end - i + 1));
        }
    }
    out
}

#[test]
fn no_engine_function_is_over_120_lines() {
    let mut files = Vec::new();
    rust_files(&crates_dir().join("virtkeep-engine/src"), &mut files);
    let mut long = Vec::new();
    for f in &files {
        for (line, name, len) in functions(&source(f)) {
            if len > MAX_FN_LINES {
                long.push(format!("{}:{line} fn {name}: {len} lines", f.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines:\n{}",
        long.join("\n")
    );
}

/// `(file:line, text)` of every non-comment line under `crates/*/src` matching `pred`.
fn grep_src(skip_crates: &[&str], pred: impl Fn(&str) -> bool) -> Vec<String> {
    let mut hits = Vec::new();
    let mut crates: Vec<_> = std::fs::read_dir(crates_dir())
        .expect("crates")
        .map(|e| e.expect("entry").path())
        .collect();
    crates.sort();
    for krate in crates {
        let name = krate.file_name().unwrap_or_default().to_string_lossy();
        if skip_crates.contains(&name.as_ref()) || !krate.join("src").is_dir() {
            continue;
        }
        let mut files = Vec::new();
        rust_files(&krate.join("src"), &mut files);
        for f in files {
            for (n, line) in source(&f).lines().enumerate() {
                if !line.trim_start().starts_with("//") && pred(line) {
                    hits.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
    }
    hits
}

#[test]
fn no_too_many_arguments_allow() {
    let hits = grep_src(&[], |l| l.contains("too_many_arguments"));
    assert!(
        hits.is_empty(),
        "use an options or context struct instead:\n{}",
        hits.join("\n")
    );
}

#[test]
fn no_string_comparison_on_backend_names() {
    let names = ["\"file\"", "\"lvm\"", "\"rbd\""];
    // virtkeep-libvirt reads libvirt's own vocabulary (a disk `type='file'`, a network
    // `protocol='rbd'`) and maps it to `Backend`; the rule is for what comes after.
    let hits = grep_src(&["virtkeep-lab", "virtkeep-libvirt"], |l| {
        names.iter().any(|n| {
            l.contains(&format!("== {n}"))
                || l.contains(&format!("!= {n}"))
                || l.trim_start().starts_with(&format!("{n} =>"))
                || l.contains(&format!("Some(({n},"))
        })
    });
    assert!(
        hits.is_empty(),
        "compare virtkeep_repo::Storage values, not names:\n{}",
        hits.join("\n")
    );
}

#[test]
fn command_lines_are_built_only_in_virtkeep_libvirt() {
    let hits = grep_src(&["virtkeep-libvirt", "virtkeep-ssh", "virtkeep-lab"], |l| {
        l.contains("RemoteCommand::new(")
    });
    assert!(
        hits.is_empty(),
        "build remote command lines with a virtkeep-libvirt builder:\n{}",
        hits.join("\n")
    );
}

#[test]
fn restore_fits_the_definition_to_the_host_before_writing() {
    let engine = crates_dir().join("virtkeep-engine/src/restore");
    let text = source(&engine.join("mod.rs"));
    let fit = text
        .find("fit_emulator(")
        .expect("restore asks for the emulator");
    let write = text
        .find("write::write(")
        .expect("restore writes the disks");
    assert!(
        fit < write,
        "restore must find the emulator before it writes a disk"
    );
    let define = source(&engine.join("define.rs"));
    let at = define
        .find("pub async fn define_restored")
        .expect("define_restored");
    assert!(
        !define[at..].contains("host_emulator("),
        "define_restored (after the disks were written) must not ask the host for the emulator"
    );
}

// ---- the checker checks itself ------------------------------------------------------

#[test]
fn use_trees_expand() {
    let mut out = Vec::new();
    expand_use("", "crate::{a::X, b::{c, d as e}, self}", &mut out);
    assert_eq!(out, ["crate::a::X", "crate::b::c", "crate::b::d", "crate"]);
}

#[test]
fn a_cycle_is_found_and_a_chain_is_not() {
    let g = |edges: &[(&str, &str)]| {
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            m.entry(a.to_string()).or_default().insert(b.to_string());
            m.entry(b.to_string()).or_default();
        }
        m
    };
    assert_eq!(
        cycles(&g(&[("a", "b"), ("b", "c"), ("c", "a")])),
        ["a -> b -> c"]
    );
    assert!(cycles(&g(&[("a", "b"), ("b", "c"), ("a", "c")])).is_empty());
}

#[test]
fn paths_resolve_to_the_module_that_defines_them() {
    let mods: BTreeMap<String, PathBuf> = ["", "backup", "backup::cbt", "host"]
        .iter()
        .map(|m| (m.to_string(), PathBuf::new()))
        .collect();
    let r = |p: &str, from: &str| resolve(p, from, &mods);
    assert_eq!(r("crate::host::Host", "backup").as_deref(), Some("host"));
    assert_eq!(r("super::Job", "backup::cbt").as_deref(), Some("backup"));
    assert_eq!(r("cbt::run", "backup").as_deref(), Some("backup::cbt"));
    assert_eq!(
        r("super::super::host", "backup::cbt").as_deref(),
        Some("host")
    );
    assert_eq!(
        r("super::super::job_id", "backup::cbt").as_deref(),
        Some("")
    );
}

#[test]
fn function_lengths_are_measured() {
    let text =
        "pub async fn one(\n    a: u8,\n) -> u8 {\n    a\n}\n\n    fn two() {}\nfn three();\n";
    let f = functions(text);
    assert_eq!(f[0], (1, "one".to_string(), 5));
    assert_eq!(f[1], (7, "two".to_string(), 1));
    assert_eq!(f.len(), 2);
}
