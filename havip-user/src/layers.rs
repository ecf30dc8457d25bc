//! The layering rules of this crate, checked from the source: each folder imports only
//! from the layers before it (config < kernel < cluster < api < node < observe < cli; `faults` from
//! anywhere), and no two modules import each other, directly or around a cycle. A module
//! may use its own ancestors (a child module implements its parent's type).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

const LAYERS: [&str; 7] = ["config", "kernel", "cluster", "api", "node", "observe", "cli"];

/// Every source file as (module path, text), e.g. ("node::placer", "...").
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
            if p.is_dir() {
                if stem != "bin" {
                    walk(&p, &join(prefix, &stem), out);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                let name = if stem == "mod" || stem == "lib" { prefix.to_string() } else { join(prefix, &stem) };
                // Tests may reach anywhere.
                let text = std::fs::read_to_string(&p).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap().to_string();
                out.insert(name, code);
            }
        }
    }
    fn join(a: &str, b: &str) -> String {
        if a.is_empty() {
            b.to_string()
        } else {
            format!("{a}::{b}")
        }
    }
    let mut out = BTreeMap::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), "", &mut out);
    out
}

/// The paths a source names after `crate::`, with `use` trees expanded:
/// `use crate::{a::{b, c}, d}` names `a::b`, `a::c` and `d`.
fn crate_paths(code: &str) -> Vec<String> {
    fn tree(s: &[u8], i: &mut usize, prefix: &str, out: &mut Vec<String>) {
        let skip_ws = |i: &mut usize| {
            while *i < s.len() && (s[*i] as char).is_whitespace() {
                *i += 1;
            }
        };
        skip_ws(i);
        if *i < s.len() && s[*i] == b'{' {
            *i += 1;
            loop {
                skip_ws(i);
                if *i >= s.len() || s[*i] == b'}' {
                    *i += 1;
                    return;
                }
                tree(s, i, prefix, out);
                skip_ws(i);
                if *i < s.len() && s[*i] == b',' {
                    *i += 1;
                }
            }
        }
        let start = *i;
        while *i < s.len() && (s[*i].is_ascii_alphanumeric() || s[*i] == b'_') {
            *i += 1;
        }
        let ident = std::str::from_utf8(&s[start..*i]).unwrap();
        let path = if ident.is_empty() || ident == "self" {
            prefix.to_string()
        } else if prefix.is_empty() {
            ident.to_string()
        } else {
            format!("{prefix}::{ident}")
        };
        if s[*i..].starts_with(b"::") {
            *i += 2;
            tree(s, i, &path, out);
        } else {
            out.push(path);
        }
    }
    let s = code.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("crate::") {
        let mut i = from + at + "crate::".len();
        tree(s, &mut i, "", &mut out);
        from = i.max(from + at + 1);
    }
    out
}

/// Module -> the modules it imports (each path cut to the longest module it names).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules();
    let mut g = BTreeMap::new();
    for (name, code) in &mods {
        let mut deps = BTreeSet::new();
        for p in crate_paths(code) {
            let segs: Vec<&str> = p.split("::").collect();
            let target = (1..=segs.len()).rev().map(|n| segs[..n].join("::")).find(|m| mods.contains_key(m));
            if let Some(t) = target {
                let ancestor_or_self = *name == t || name.starts_with(&format!("{t}::"));
                if !ancestor_or_self {
                    deps.insert(t);
                }
            }
        }
        g.insert(name.clone(), deps);
    }
    g
}

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| module == *l || module.starts_with(&format!("{l}::")))
}

#[test]
fn the_use_tree_parser_expands_groups() {
    let got = crate_paths("use crate::{a::{b, c::D}, e, f::{self, G}};\nlet x = crate::h::i(1);");
    assert_eq!(got, ["a::b", "a::c::D", "e", "f", "f::G", "h::i"]);
}

#[test]
fn layers_import_only_from_layers_before_them() {
    let mut bad = Vec::new();
    for (m, deps) in graph() {
        let Some(lm) = layer(&m) else { continue };
        for d in deps {
            if let Some(ld) = layer(&d) {
                if ld > lm {
                    bad.push(format!("{m} ({}) imports {d} ({})", LAYERS[lm], LAYERS[ld]));
                }
            }
        }
    }
    assert!(bad.is_empty(), "layering broken:\n  {}", bad.join("\n  "));
}

#[test]
fn no_module_import_cycles() {
    let g = graph();
    assert!(g.len() > 30, "found only {} modules: is the source walk broken?", g.len());
    // Depth-first search for a back edge.
    fn visit(m: &str, g: &BTreeMap<String, BTreeSet<String>>, state: &mut BTreeMap<String, u8>, stack: &mut Vec<String>) -> Option<Vec<String>> {
        match state.get(m) {
            Some(2) => return None,
            Some(1) => {
                let at = stack.iter().position(|s| s == m).unwrap();
                let mut cycle = stack[at..].to_vec();
                cycle.push(m.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, g, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in g.keys() {
        if let Some(c) = visit(m, &g, &mut state, &mut Vec::new()) {
            panic!("import cycle: {}", c.join(" -> "));
        }
    }
}
