//! The layering rule of `docs/ARCHITECTURE.md`, enforced.
//!
//! Every file under `src/` (the library; the binary sits on top and may use all of it) is read for the module
//! paths it names: `use crate::…` and `use super::…` trees, and inline `crate::a::b` and `super::x` paths in code
//! (comments and string literals are skipped, so a doc link is not a dependency). Each path is resolved to the
//! module it reaches (the crate root's `pub use` re-exports are followed) and checked two ways:
//!
//! - **Across top-level modules** a module may only name modules on a lower floor of [`FLOORS`]: never its own
//!   floor (so `norm` and `nn` never import each other) and never a higher one.
//! - **Inside a top-level module** the files of one folder may use each other, and their parent, but not in a
//!   cycle (as `batch_kernels` and `rows_kernels` once did).
//!
//! A new top-level module must be given a floor here, and a new floor is a change to the architecture page.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The floors, lowest first. A module imports only from floors below its own.
const FLOORS: &[(&str, u32)] = &[
    // the core, in four small floors: scalars, modes, the seeded RNG and process settings; errors and
    // parameters; state dicts, the forward context and the communicators of a group of workers; the Layer
    // trait that every layer implements
    ("real", 0),
    ("mode", 0),
    ("rng", 0),
    ("runtime", 0),
    ("error", 1),
    ("param", 1),
    ("state", 2),
    ("ctx", 2),
    ("comm", 2),
    ("layer", 3),
    // the private SIMD and streaming kernels, the arena and the shape helpers
    ("kernels", 4),
    // the layers and the other leaves of the system: peers that never import each other
    ("norm", 5),
    ("nn", 5),
    ("data", 5),
    ("optim", 5),
    // graphs, plans and the zoo
    ("model", 6),
    // state dicts, checkpoints' files, model interchange
    ("io", 7),
    // training, then what is built on training
    ("train", 8),
    ("dist", 9),
    // the tasks (segmentation, detection), then the evidence, which runs them
    ("segment", 9),
    ("detect", 9),
    ("tasks", 9),
    ("experiment", 10),
];

/// Modules above every floor: the crate root's re-exports and the hidden module for benchmarks and tests.
const TOP: &[&str] = &["internals"];

type ModPath = Vec<String>;

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Violation {
    /// A module names one on its own floor or above it.
    Upward {
        file: String,
        from: String,
        to: String,
        path: String,
    },
    /// A top-level module without a floor.
    Unplaced { file: String, module: String },
    /// The files of one folder import each other in a cycle.
    Cycle {
        folder: String,
        members: Vec<String>,
    },
}

/// Replaces comments and the contents of string and char literals with spaces (newlines kept).
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < c.len() {
        if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && matches!(c.get(i + 1), Some('"') | Some('#'))
            && (i == 0 || !is_ident(c[i - 1]))
        {
            // raw string r"…" or r#"…"#
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            out.push_str(&" ".repeat(j + 1 - i));
            i = j + 1;
            while i < c.len() {
                if c[i] == '"' && (0..hashes).all(|h| c.get(i + 1 + h) == Some(&'#')) {
                    out.push_str(&" ".repeat(1 + hashes));
                    i += 1 + hashes;
                    break;
                }
                out.push(blank(c[i]));
                i += 1;
            }
        } else if c[i] == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < c.len() {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c[i] == '\'' {
            // a char literal ('x', '\n', '\u{..}'), or a lifetime ('a) that is kept
            if c.get(i + 1) == Some(&'\\') {
                out.push(' ');
                i += 1;
                while i < c.len() && c[i] != '\'' {
                    if c[i] == '\\' {
                        out.push(' ');
                        i += 1;
                    }
                    out.push(' ');
                    i += 1;
                }
                out.push(' ');
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                out.push_str("   ");
                i += 3;
            } else {
                out.push('\'');
                i += 1;
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

fn tokens(code: &str) -> Vec<String> {
    let c: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if is_ident(c[i]) {
            let s = i;
            while i < c.len() && is_ident(c[i]) {
                i += 1;
            }
            out.push(c[s..i].iter().collect());
        } else if c[i] == ':' && c.get(i + 1) == Some(&':') {
            out.push("::".into());
            i += 2;
        } else if c[i].is_whitespace() {
            i += 1;
        } else {
            out.push(c[i].to_string());
            i += 1;
        }
    }
    out
}

/// Expands a `use` tree starting at `t[*i]` into full paths (a glob is its prefix).
fn use_tree(t: &[String], i: &mut usize, prefix: &ModPath, out: &mut Vec<ModPath>) {
    let mut path = prefix.clone();
    loop {
        match t.get(*i).map(String::as_str) {
            Some("{") => {
                *i += 1;
                while t.get(*i).map(String::as_str) != Some("}") && *i < t.len() {
                    use_tree(t, i, &path, out);
                    if t.get(*i).map(String::as_str) == Some(",") {
                        *i += 1;
                    }
                }
                *i += 1;
                return;
            }
            Some("*") => {
                *i += 1;
                out.push(path);
                return;
            }
            Some("self") if !path.is_empty() => {
                *i += 1;
            }
            Some(seg) if is_ident(seg.chars().next().unwrap_or(' ')) => {
                path.push(seg.to_string());
                *i += 1;
            }
            _ => {
                out.push(path);
                return;
            }
        }
        match t.get(*i).map(String::as_str) {
            Some("::") => *i += 1,
            Some("as") => {
                *i += 2;
                out.push(path);
                return;
            }
            _ => {
                out.push(path);
                return;
            }
        }
    }
}

/// Every path a file names, with the module (the file's, or an inline `mod` inside it) it is named from.
fn named_paths(file_mod: &ModPath, src: &str) -> Vec<(ModPath, ModPath)> {
    let t = tokens(&strip(src));
    let mut found = Vec::new();
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    let here = |inline: &[(String, usize)]| {
        let mut m = file_mod.clone();
        m.extend(inline.iter().map(|(n, _)| n.clone()));
        m
    };
    while i < t.len() {
        match t[i].as_str() {
            "{" => {
                depth += 1;
                i += 1;
            }
            "}" => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            "mod" if t.get(i + 2).map(String::as_str) == Some("{") => {
                depth += 1;
                inline.push((t[i + 1].clone(), depth));
                i += 3;
            }
            "use" => {
                i += 1;
                let mut paths = Vec::new();
                use_tree(&t, &mut i, &Vec::new(), &mut paths);
                for mut p in paths {
                    match p.first().map(String::as_str) {
                        Some("crate" | "super" | "self") => found.push((here(&inline), p)),
                        // in the crate root, `use norm::X` names the crate's own module
                        Some(_) if file_mod.is_empty() && inline.is_empty() => {
                            p.insert(0, "crate".into());
                            found.push((here(&inline), p));
                        }
                        _ => {}
                    }
                }
            }
            "crate" | "super" if t.get(i + 1).map(String::as_str) == Some("::") => {
                let mut p = vec![t[i].clone()];
                i += 1;
                while t.get(i).map(String::as_str) == Some("::")
                    && t.get(i + 1)
                        .is_some_and(|s| is_ident(s.chars().next().unwrap_or(' ')))
                {
                    p.push(t[i + 1].clone());
                    i += 2;
                }
                found.push((here(&inline), p));
            }
            _ => i += 1,
        }
    }
    found
}

/// Resolves a named path to an absolute one from the crate root, following the root's re-exports.
fn resolve(from: &ModPath, path: &ModPath, aliases: &BTreeMap<String, ModPath>) -> Option<ModPath> {
    let mut segs = path.iter().peekable();
    let mut abs: ModPath = match segs.peek().map(|s| s.as_str()) {
        Some("crate") => {
            segs.next();
            Vec::new()
        }
        Some("self") => {
            segs.next();
            from.clone()
        }
        _ => from.clone(),
    };
    while segs.peek().map(|s| s.as_str()) == Some("super") {
        segs.next();
        abs.pop()?;
    }
    abs.extend(segs.cloned());
    if let Some(target) = abs.first().and_then(|s| aliases.get(s)) {
        let mut re = target.clone();
        re.extend(abs[1..].iter().cloned());
        abs = re;
    }
    Some(abs)
}

fn has_cycle_from(
    n: &str,
    edges: &BTreeMap<String, BTreeSet<String>>,
    stack: &mut Vec<String>,
) -> Option<Vec<String>> {
    if let Some(at) = stack.iter().position(|s| s == n) {
        return Some(stack[at..].to_vec());
    }
    stack.push(n.to_string());
    for m in edges.get(n).into_iter().flatten() {
        if let Some(c) = has_cycle_from(m, edges, stack) {
            return Some(c);
        }
    }
    stack.pop();
    None
}

/// Checks a crate given as (module path of each file, its source); `lib.rs` is the empty path.
fn check(files: &[(ModPath, String)], floors: &[(&str, u32)]) -> Vec<Violation> {
    let floor: BTreeMap<&str, u32> = floors.iter().copied().collect();
    let mut modules: BTreeSet<ModPath> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut aliases = BTreeMap::new();
    let mut refs = Vec::new();
    for (m, src) in files {
        for (from, p) in named_paths(m, src) {
            if m.is_empty() && from.is_empty() && p.len() >= 3 {
                // `pub use ctx::{Ctx, …}` in lib.rs: `crate::Ctx` means `crate::ctx::Ctx`
                aliases.insert(p.last().unwrap().clone(), p[1..].to_vec());
            }
            if from.len() > m.len() {
                modules.insert(from.clone());
            }
            refs.push((m.clone(), from, p));
        }
    }
    let mut out = Vec::new();
    let mut siblings: BTreeMap<ModPath, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let name = |m: &ModPath| {
        if m.is_empty() {
            "crate".to_string()
        } else {
            m.join("::")
        }
    };
    for (file, from, p) in refs {
        let Some(to) = resolve(&from, &p, &aliases) else {
            continue;
        };
        let (Some(unit_from), Some(unit_to)) = (file.first(), to.first()) else {
            continue;
        };
        if unit_from != unit_to {
            if !modules.contains(&vec![unit_to.clone()]) {
                continue; // an item of the crate root itself
            }
            if TOP.contains(&unit_from.as_str()) {
                continue;
            }
            match (floor.get(unit_from.as_str()), floor.get(unit_to.as_str())) {
                (Some(a), Some(b)) if b < a => {}
                (None, _) => out.push(Violation::Unplaced {
                    file: name(&file),
                    module: unit_from.clone(),
                }),
                (_, None) => out.push(Violation::Unplaced {
                    file: name(&file),
                    module: unit_to.clone(),
                }),
                _ => out.push(Violation::Upward {
                    file: name(&file),
                    from: unit_from.clone(),
                    to: unit_to.clone(),
                    path: p.join("::"),
                }),
            }
            continue;
        }
        // inside one top-level module: an edge between two sibling files of one folder
        let common = file.iter().zip(&to).take_while(|(a, b)| a == b).count();
        if common >= file.len() || common >= to.len() {
            continue; // a child of the file, or the file itself
        }
        let folder: ModPath = file[..common].to_vec();
        let mut target = folder.clone();
        target.push(to[common].clone());
        if !modules.contains(&target) {
            continue; // an item of the common parent
        }
        siblings
            .entry(folder)
            .or_default()
            .entry(file[common].clone())
            .or_default()
            .insert(to[common].clone());
    }
    for (folder, edges) in &siblings {
        let mut seen = BTreeSet::new();
        for n in edges.keys() {
            if let Some(mut c) = has_cycle_from(n, edges, &mut Vec::new()) {
                c.sort();
                if seen.insert(c.clone()) {
                    out.push(Violation::Cycle {
                        folder: name(folder),
                        members: c,
                    });
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn read_crate(root: &Path) -> Vec<(ModPath, String)> {
    fn walk(dir: &Path, rel: &ModPath, out: &mut Vec<(ModPath, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let stem = path.file_stem().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                if rel.is_empty() && stem == "bin" {
                    continue; // the binary is its own crate, on top of the library
                }
                let mut r = rel.clone();
                r.push(stem);
                walk(&path, &r, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let mut m = rel.clone();
                if stem != "mod" && !(rel.is_empty() && stem == "lib") {
                    m.push(stem);
                }
                out.push((m, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &Vec::new(), &mut out);
    out
}

#[test]
fn the_library_keeps_its_floors_and_has_no_cycles() {
    let files = read_crate(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(files.len() > 50, "read only {} files", files.len());
    // the check sees real dependencies: the model floor names norm, nn and kernels
    let mut model_deps = BTreeSet::new();
    for (m, src) in &files {
        if m.first().map(String::as_str) == Some("model") {
            for (_, p) in named_paths(m, src) {
                if p.first().map(String::as_str) == Some("crate") && p.len() > 1 {
                    model_deps.insert(p[1].clone());
                }
            }
        }
    }
    for dep in ["norm", "nn", "kernels", "layer"] {
        assert!(
            model_deps.contains(dep),
            "model's dependencies {model_deps:?} miss {dep}"
        );
    }
    let violations = check(&files, FLOORS);
    assert!(
        violations.is_empty(),
        "layering violations:\n{violations:#?}"
    );
}

fn m(p: &str) -> ModPath {
    if p.is_empty() {
        Vec::new()
    } else {
        p.split("::").map(String::from).collect()
    }
}

fn fake(files: &[(&str, &str)]) -> Vec<Violation> {
    let files: Vec<_> = files.iter().map(|(p, s)| (m(p), s.to_string())).collect();
    check(&files, FLOORS)
}

#[test]
fn a_peer_import_is_caught_in_use_trees_inline_paths_and_through_root_reexports() {
    let base = [
        ("", "pub use norm::BatchNorm;\npub use layer::Layer;"),
        ("layer", ""),
        ("norm", ""),
        ("nn", ""),
    ];
    for src in [
        "use crate::norm::BatchNorm;",
        "use crate::{layer::Layer, norm::{batch::{self, stats}}};",
        "fn f() { let _ = crate::norm::batch::stats::mean(); }",
        "use crate::BatchNorm;",
        "use super::super::norm::*;",
    ] {
        let mut files = base.to_vec();
        files.push(("nn::conv", src));
        let v = fake(&files);
        assert!(
            !v.is_empty() && v.iter().all(|v| matches!(v, Violation::Upward { from, to, .. } if from == "nn" && to == "norm")),
            "{src}: {v:?}"
        );
    }
}

#[test]
fn downward_imports_comments_strings_and_parents_pass() {
    let v = fake(&[
        ("", "pub use layer::Layer;"),
        ("layer", ""),
        ("kernels", ""),
        ("nn", "mod conv;"),
        (
            "nn::conv",
            "use crate::Layer; use crate::kernels::arena; use super::Linear;\n\
             /// see [`crate::norm::BatchNorm`]\nconst S: &str = \"crate::norm::x\"; // crate::norm\n\
             #[cfg(test)] mod tests { use super::*; }",
        ),
        ("nn::linear", ""),
    ]);
    assert!(v.is_empty(), "{v:?}");
}

#[test]
fn upward_imports_and_unplaced_modules_are_caught() {
    let v = fake(&[
        ("layer", "use crate::model::Graph;"),
        ("model", ""),
        ("widgets", "use crate::layer::Layer;"),
    ]);
    assert_eq!(
        v,
        vec![
            Violation::Upward {
                file: "layer".into(),
                from: "layer".into(),
                to: "model".into(),
                path: "crate::model::Graph".into()
            },
            Violation::Unplaced {
                file: "widgets".into(),
                module: "widgets".into()
            },
        ]
    );
}

#[test]
fn a_cycle_between_sibling_files_is_caught_and_a_chain_is_not() {
    let v = fake(&[
        ("norm", ""),
        ("norm::batch", ""),
        ("norm::batch::planes", "use super::rows::x;"),
        ("norm::batch::rows", "use crate::norm::batch::stats::y;"),
        ("norm::batch::stats", "fn f() { super::planes::z(); }"),
    ]);
    assert_eq!(
        v,
        vec![Violation::Cycle {
            folder: "norm::batch".into(),
            members: vec!["planes".into(), "rows".into(), "stats".into()]
        }]
    );
    let chain = fake(&[
        ("norm", ""),
        ("norm::batch", ""),
        ("norm::batch::planes", "use super::rows::x;"),
        ("norm::batch::rows", "use crate::norm::batch::stats::y;"),
        ("norm::batch::stats", "use crate::norm::batch::BatchNorm;"),
    ]);
    assert!(chain.is_empty(), "{chain:?}");
}
