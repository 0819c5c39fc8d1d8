//! No inherent method shadows a method of a trait its type implements (as `Conv2d::forward(&mut self, x)` once
//! shadowed `Layer::forward(x, mode)`): `x.forward(…)` must mean one thing. Reads every file under `src/`, finds
//! the types that implement `Layer`, `Stateful` or `NormLayer`, and the functions of their inherent `impl`
//! blocks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const TRAITS: &[(&str, &[&str])] = &[
    (
        "Layer",
        &[
            "forward",
            "backward",
            "backward_params",
            "output_shape",
            "name",
        ],
    ),
    (
        "Stateful",
        &[
            "save_state",
            "load_state",
            "visit_params",
            "zero_grad",
            "state_dict",
            "load_strict",
        ],
    ),
    (
        "NormLayer",
        &["forward_into", "backward_into", "running_stats"],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<(String, String)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push((
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            ));
        }
    }
}

/// The identifier starting at `i`.
fn ident(s: &str, i: usize) -> &str {
    let end = s[i..]
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .map_or(s.len(), |k| i + k);
    &s[i..end]
}

/// The text of the `{ … }` block whose `{` is at or after `i`.
fn block(s: &str, i: usize) -> &str {
    let open = i + s[i..].find('{').unwrap();
    let mut depth = 0;
    for (k, c) in s[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &s[open..open + k];
                }
            }
            _ => {}
        }
    }
    &s[open..]
}

/// (trait impls per type, inherent method names per type with their files).
type Found = (
    BTreeMap<String, BTreeSet<String>>,
    Vec<(String, String, String)>,
);

fn scan(files: &[(String, String)]) -> Found {
    let mut traits: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut inherent = vec![];
    for (path, s) in files {
        for (at, _) in s.match_indices("\nimpl") {
            // skip the generics: `impl<T: Real> ` then either `Trait<T> for Type` or `Type<T> {`
            let mut i = at + 5;
            if s[i..].starts_with('<') {
                let mut depth = 0;
                for (k, c) in s[i..].char_indices() {
                    match c {
                        '<' => depth += 1,
                        '>' => {
                            depth -= 1;
                            if depth == 0 {
                                i += k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
            }
            let head = &s[i..i + s[i..].find('{').unwrap_or(0)];
            let head = head.trim();
            if let Some((tr, ty)) = head.split_once(" for ") {
                let tr = tr.rsplit("::").next().unwrap();
                let tr = tr.split('<').next().unwrap().trim();
                let ty = ty.split('<').next().unwrap().trim();
                traits
                    .entry(ty.to_string())
                    .or_default()
                    .insert(tr.to_string());
            } else if !head.is_empty() {
                let ty = head.split('<').next().unwrap().trim().to_string();
                let body = block(s, i);
                for (k, _) in body.match_indices("\n    ") {
                    let line = &body[k + 5..];
                    let line = line
                        .strip_prefix("pub(crate) ")
                        .or_else(|| line.strip_prefix("pub "))
                        .unwrap_or(line);
                    if let Some(rest) = line.strip_prefix("fn ") {
                        let name = ident(rest, 0).to_string();
                        inherent.push((path.clone(), ty.clone(), name));
                    }
                }
            }
        }
    }
    (traits, inherent)
}

fn shadows(files: &[(String, String)]) -> Vec<String> {
    let (traits, inherent) = scan(files);
    let mut out = vec![];
    for (path, ty, name) in inherent {
        for (tr, methods) in TRAITS {
            if traits.get(&ty).is_some_and(|t| t.contains(*tr)) && methods.contains(&name.as_str())
            {
                out.push(format!("{path}: {ty}::{name} shadows {tr}::{name}"));
            }
        }
    }
    out
}

#[test]
fn no_inherent_method_shadows_a_trait_method() {
    let mut files = vec![];
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let (traits, inherent) = scan(&files);
    // the scan sees the library's layers and their inherent methods
    assert!(
        traits
            .get("Conv2d")
            .is_some_and(|t| t.contains("Layer") && t.contains("Stateful")),
        "{traits:?}"
    );
    assert!(inherent
        .iter()
        .any(|(_, ty, f)| ty == "Conv2d" && f == "forward_with"));
    let found = shadows(&files);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn a_shadowing_method_is_found() {
    let src = "\nimpl<T: Real> Layer<T> for Conv2d<T> {\n    fn forward(&mut self) {}\n}\n\
               \nimpl<T: Real> Conv2d<T> {\n    pub fn forward(&mut self, x: &X) {}\n    pub fn other(&self) {}\n}\n";
    let found = shadows(&[("conv.rs".into(), src.into())]);
    assert_eq!(
        found,
        vec!["conv.rs: Conv2d::forward shadows Layer::forward"]
    );
}
