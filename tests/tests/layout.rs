//! The house's shape, checked: the README's layout table lists exactly the
//! workspace's crates, each crate's `lib.rs` says what it owns, and no two
//! modules of a crate import each other, directly or round a loop (the crate
//! root, which holds each crate's error type and re-exports, aside).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The workspace members named in the root Cargo.toml.
fn members() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let list = text
        .split("members = [")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    list.split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

#[test]
fn the_readme_layout_table_lists_the_crates() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let table: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(|p| p.trim_end_matches('/').to_string())
        .filter(|p| p.starts_with("services/") || p == "jobs" || p == "tests")
        .collect();
    let members: BTreeSet<String> = members().into_iter().collect();
    assert_eq!(table, members, "README layout table vs workspace members");
    for m in &members {
        let lib = root().join(m).join("src/lib.rs");
        let head = std::fs::read_to_string(&lib).unwrap();
        assert!(
            head.starts_with("//!"),
            "{} does not say what it owns",
            lib.display()
        );
    }
}

/// A crate's modules by path (`a::b`), each with its file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            out.insert(parts.join("::"), p);
        }
    }
    out
}

/// The module a path names: its longest prefix that is a module.
fn resolve(path: &[String], known: &BTreeMap<String, PathBuf>) -> Option<String> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|p| known.contains_key(p))
}

/// The paths a file's non-test code names through `crate::` and `super::`,
/// as absolute module paths.
fn references(module: &str, text: &str) -> Vec<Vec<String>> {
    // Code only: neither tests nor comments (doc links name modules freely).
    let code: String = text
        .split("#[cfg(test)]")
        .next()
        .unwrap_or(text)
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let code = code.as_str();
    let here: Vec<String> = if module.is_empty() {
        Vec::new()
    } else {
        module.split("::").map(str::to_string).collect()
    };
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < code.len() {
        if !code.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let rest = &code[i..];
        let (mut base, skip) = if rest.starts_with("crate::") {
            (Vec::new(), "crate::".len())
        } else if rest.starts_with("super::") {
            (
                here[..here.len().saturating_sub(1)].to_vec(),
                "super::".len(),
            )
        } else {
            i += 1;
            continue;
        };
        // `crate` or `super` must start a path, not end an identifier.
        if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') {
            i += 1;
            continue;
        }
        let mut j = i + skip;
        while code[j..].starts_with("super::") {
            base.pop();
            j += "super::".len();
        }
        let tail = &code[j..];
        if let Some(group) = tail.strip_prefix('{') {
            // `use crate::{a, b::c}`: each entry's first segment.
            let inner = group.split('}').next().unwrap_or("");
            for entry in inner.split(',') {
                let first: String = entry
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !first.is_empty() {
                    let mut p = base.clone();
                    p.push(first);
                    out.push(p);
                }
            }
        } else {
            let path: String = tail
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let mut p = base.clone();
            p.extend(
                path.split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            );
            out.push(p);
        }
        i = j;
    }
    out
}

/// Every cycle's modules, in order.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut Vec<Vec<String>>,
    ) {
        if let Some(at) = stack.iter().position(|s| s == n) {
            found.push(stack[at..].to_vec());
            return;
        }
        if !done.insert(n.to_string()) {
            return;
        }
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            visit(m, edges, stack, done, found);
        }
        stack.pop();
    }
    let (mut found, mut done) = (Vec::new(), BTreeSet::new());
    for n in edges.keys() {
        visit(n, edges, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let mut all = Vec::new();
    for member in members() {
        let src = root().join(&member).join("src");
        let known = modules(&src);
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (module, file) in &known {
            let text = std::fs::read_to_string(file).unwrap();
            for path in references(module, &text) {
                if let Some(target) = resolve(&path, &known)
                    && !target.is_empty()
                    && target != *module
                    // A module naming its own child is its declaration at work.
                    && !target.starts_with(&format!("{module}::"))
                    && !module.is_empty()
                {
                    edges.entry(module.clone()).or_default().insert(target);
                }
            }
        }
        for c in cycles(&edges) {
            all.push(format!("{member}: {}", c.join(" -> ")));
        }
    }
    assert!(all.is_empty(), "import cycles:\n{}", all.join("\n"));
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    // Two modules naming each other, as gguf.rs and model.rs once did.
    let known: BTreeMap<String, PathBuf> = ["", "a", "b"]
        .iter()
        .map(|m| (m.to_string(), PathBuf::new()))
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, text) in [
        ("a", "use crate::b::Thing;"),
        ("b", "use crate::{a, Result};"),
    ] {
        for p in references(m, text) {
            if let Some(t) = resolve(&p, &known).filter(|t| !t.is_empty() && t != m) {
                edges.entry(m.to_string()).or_default().insert(t);
            }
        }
    }
    assert_eq!(cycles(&edges), vec![vec!["a".to_string(), "b".to_string()]]);
}

/// A member's short name: `services/loop` is `loop`.
fn short(member: &str) -> String {
    member.rsplit('/').next().unwrap_or(member).to_string()
}

/// The workspace crates a member's `[dependencies]` name (dev-dependencies
/// aside), by short name.
fn uses(member: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join(member).join("Cargo.toml")).unwrap();
    let mut out = BTreeSet::new();
    let mut in_deps = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        let name = line.split(['=', '.', ' ']).next().unwrap_or("");
        if in_deps && (name == "flywheel" || name.starts_with("flywheel-")) {
            let short = name.strip_prefix("flywheel-").unwrap_or(name);
            out.insert(short.to_string());
        }
    }
    out
}

/// The README's whiteboard of crates: `crate ─▶ uses...` lines in the
/// block that follows the `<!-- whiteboard -->` mark.
fn whiteboard() -> BTreeMap<String, BTreeSet<String>> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let block = readme
        .split("<!-- whiteboard -->")
        .nth(1)
        .expect("README has a <!-- whiteboard --> block")
        .split("```")
        .nth(1)
        .unwrap();
    block
        .lines()
        .filter_map(|l| l.split_once('─'))
        .map(|(left, right)| {
            let name = left.split_whitespace().last().unwrap_or("").to_string();
            let deps = right
                .trim_start_matches(['─', '▶'])
                .split([' ', ','])
                .map(str::trim)
                .filter(|d| !d.is_empty() && *d != "(nothing)")
                .map(str::to_string)
                .collect();
            (name, deps)
        })
        .collect()
}

#[test]
fn the_readme_whiteboard_draws_each_crate_with_what_it_uses() {
    let drawn = whiteboard();
    let actual: BTreeMap<String, BTreeSet<String>> = members()
        .iter()
        .filter(|m| *m != "tests")
        .map(|m| (short(m), uses(m)))
        .collect();
    assert_eq!(
        drawn, actual,
        "README whiteboard vs the crates' [dependencies]"
    );
}

#[test]
fn nothing_but_the_binary_uses_the_worker_and_the_faces_use_no_model_code() {
    // The test-support crate starts workers in tests; it is no part of the
    // product.
    for m in members().iter().filter(|m| *m != "tests") {
        let u = uses(m);
        if short(m) != "flywheel" {
            assert!(!u.contains("jobs"), "{m} uses the worker");
        }
    }
    let admin = uses("services/admin");
    for forbidden in ["jobs", "engine", "model", "modelhub", "trainer"] {
        assert!(!admin.contains(forbidden), "the dashboard uses {forbidden}");
    }
    assert!(admin.contains("loop") && admin.contains("store"));
    let gateway = uses("services/gateway");
    for forbidden in ["jobs", "loop", "model", "modelhub", "trainer"] {
        assert!(!gateway.contains(forbidden), "the gateway uses {forbidden}");
    }
    let the_loop = uses("services/loop");
    assert_eq!(
        the_loop,
        ["eval", "store"].map(String::from).into_iter().collect(),
        "the loop depends on the store and the evaluation only"
    );
}
