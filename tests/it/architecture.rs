//! The module graph of `src/`: which top-level module names which (`crate::x`), and that it has
//! no cycle. `config` sits at the top assembling every section; shared leaves (`validate`,
//! `model`, `seed`, `fsutil`) at the bottom. The graph is written as Graphviz to
//! `$CARGO_TARGET_TMPDIR/modules.dot` (`dot -Tpng modules.dot -o modules.png` draws it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module -> the top-level modules its code names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if top == "main" || top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let names = g.entry(top.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a::{b, c}, d}`: the first segment of each item at brace depth 0.
                let mut depth = 0;
                let mut item_start = true;
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if item_start && !c.is_whitespace() => {
                            names.insert(ident(&group[j..]));
                            item_start = false;
                        }
                        _ => {}
                    }
                }
            } else {
                names.insert(ident(rest));
            }
        }
        names.remove(&top);
    }
    let tops: BTreeSet<String> = g.keys().cloned().collect();
    for names in g.values_mut() {
        names.retain(|n| tops.contains(n));
    }
    g
}

/// A cycle through `start`, if any (depth-first search).
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(n: &str, g: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut c = path[at..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in &g[n] {
            if let Some(c) = visit(m, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|n| visit(n, g, &mut Vec::new(), &mut done))
}

#[test]
fn the_module_graph_has_no_cycle() {
    let g = graph();
    let mut dot = String::from("digraph modules {\n  rankdir=LR;\n");
    for (a, bs) in &g {
        for b in bs {
            dot.push_str(&format!("  \"{a}\" -> \"{b}\";\n"));
        }
    }
    dot.push_str("}\n");
    std::fs::write(Path::new(env!("CARGO_TARGET_TMPDIR")).join("modules.dot"), &dot).unwrap();
    assert!(g.len() > 15, "{g:?}");
    assert!(g["config"].contains("engine") && g["engine"].contains("model"), "the parser must see real edges: {g:?}");
    for leaf in ["validate", "model", "seed", "fsutil"] {
        assert!(g[leaf].is_empty(), "{leaf} is meant to be a leaf but names {:?}", g[leaf]);
    }
    assert_eq!(cycle(&g), None, "module cycle");
    // The checker itself finds a cycle when there is one.
    let mut bad = g.clone();
    bad.get_mut("model").unwrap().insert("config".into());
    assert!(cycle(&bad).is_some());
}
