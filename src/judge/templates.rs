//! Judge prompt templates: text files with `{placeholder}`s, checked when they are loaded.
//!
//! The defaults live in `prompts/` and are compiled in; `judge.templates` names a directory
//! holding replacements with the same file names. A placeholder the template kind does not
//! know, a required one that is missing, or an unbalanced brace is an error naming the file and
//! line. `{{` and `}}` are literal braces. Rendering is a single pass, and every inserted value
//! goes through [`neutralise`] first, so nothing an answer contains is read as a placeholder, a
//! delimiter or a verdict tag.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::verdict::{neutralise, Labels};
use super::Comparison;

/// The six templates and the placeholders each may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateKind {
    Pairwise,
    PairwiseCriteria,
    PairwiseLabel,
    PairwiseCriteriaLabel,
    Pointwise,
    PointwiseCriteria,
}

impl TemplateKind {
    pub const ALL: [TemplateKind; 6] = [
        TemplateKind::Pairwise,
        TemplateKind::PairwiseCriteria,
        TemplateKind::PairwiseLabel,
        TemplateKind::PairwiseCriteriaLabel,
        TemplateKind::Pointwise,
        TemplateKind::PointwiseCriteria,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            TemplateKind::Pairwise => "pairwise.txt",
            TemplateKind::PairwiseCriteria => "pairwise-criteria.txt",
            TemplateKind::PairwiseLabel => "pairwise-label.txt",
            TemplateKind::PairwiseCriteriaLabel => "pairwise-criteria-label.txt",
            TemplateKind::Pointwise => "pointwise.txt",
            TemplateKind::PointwiseCriteria => "pointwise-criteria.txt",
        }
    }

    fn builtin(self) -> &'static str {
        match self {
            TemplateKind::Pairwise => include_str!("../../prompts/pairwise.txt"),
            TemplateKind::PairwiseCriteria => include_str!("../../prompts/pairwise-criteria.txt"),
            TemplateKind::PairwiseLabel => include_str!("../../prompts/pairwise-label.txt"),
            TemplateKind::PairwiseCriteriaLabel => {
                include_str!("../../prompts/pairwise-criteria-label.txt")
            }
            TemplateKind::Pointwise => include_str!("../../prompts/pointwise.txt"),
            TemplateKind::PointwiseCriteria => include_str!("../../prompts/pointwise-criteria.txt"),
        }
    }

    /// (required, optional) placeholders.
    fn placeholders(self) -> (&'static [&'static str], &'static [&'static str]) {
        const LABELS: &[&str] = &["first_label", "second_label", "tie_label"];
        match self {
            TemplateKind::Pairwise => (&["prompt", "first", "second"], &[]),
            TemplateKind::PairwiseCriteria => (&["prompt", "criteria", "first", "second"], &[]),
            TemplateKind::PairwiseLabel => (&["prompt", "first", "second"], LABELS),
            TemplateKind::PairwiseCriteriaLabel => (&["prompt", "criteria", "first", "second"], LABELS),
            TemplateKind::Pointwise => (&["prompt", "answer"], &[]),
            TemplateKind::PointwiseCriteria => (&["prompt", "criteria", "answer"], &[]),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Slot(String),
}

/// One parsed template.
#[derive(Debug, Clone)]
pub struct Template {
    pub source: String,
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text`; errors name `source` (a path or "built-in NAME") and the line.
    pub fn parse(source: &str, text: &str, kind: TemplateKind) -> Result<Self> {
        let (required, optional) = kind.placeholders();
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut seen = Vec::new();
        let mut chars = text.char_indices().peekable();
        let line_of = |i: usize| text[..i].matches('\n').count() + 1;
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|x| x.1) == Some('{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek().map(|x| x.1) == Some('}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let rest = &text[i + 1..];
                    let Some(end) = rest.find('}') else {
                        bail!("{source}:{}: unclosed '{{' (write {{{{ for a literal brace)", line_of(i));
                    };
                    let name = &rest[..end];
                    if name.is_empty() || !name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                        bail!(
                            "{source}:{}: bad placeholder {{{name}}} (write {{{{ for a literal brace)",
                            line_of(i)
                        );
                    }
                    if !required.contains(&name) && !optional.contains(&name) {
                        let allowed: Vec<&str> = required.iter().chain(optional).copied().collect();
                        bail!(
                            "{source}:{}: unknown placeholder {{{name}}}; this template may use {}",
                            line_of(i),
                            allowed.iter().map(|a| format!("{{{a}}}")).collect::<Vec<_>>().join(", ")
                        );
                    }
                    for _ in 0..=end {
                        chars.next();
                    }
                    parts.push(Part::Text(std::mem::take(&mut lit)));
                    parts.push(Part::Slot(name.to_string()));
                    seen.push(name.to_string());
                }
                '}' => bail!("{source}:{}: unmatched '}}' (write }}}} for a literal brace)", line_of(i)),
                c => lit.push(c),
            }
        }
        parts.push(Part::Text(lit));
        for r in required {
            if !seen.iter().any(|s| s == r) {
                bail!("{source}: template lacks the required placeholder {{{r}}}");
            }
        }
        Ok(Self { source: source.to_string(), parts })
    }

    /// Fills the slots in one pass; values are inserted as given.
    pub fn render(&self, values: &[(&str, &str)]) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Slot(name) => {
                    if let Some((_, v)) = values.iter().find(|(k, _)| k == name) {
                        out.push_str(v);
                    }
                }
            }
        }
        out
    }
}

/// All judge templates, parsed.
#[derive(Debug, Clone)]
pub struct Templates {
    templates: Vec<(TemplateKind, Template)>,
}

impl Templates {
    /// The compiled-in defaults (the files in `prompts/`).
    pub fn builtin() -> Self {
        Self::load(None).expect("built-in templates are valid")
    }

    /// Loads every template from `dir`, or the built-in ones when `dir` is None.
    pub fn load(dir: Option<&Path>) -> Result<Self> {
        let mut templates = Vec::new();
        for kind in TemplateKind::ALL {
            let t = match dir {
                None => Template::parse(&format!("built-in {}", kind.file_name()), kind.builtin(), kind)?,
                Some(d) => {
                    let path: PathBuf = d.join(kind.file_name());
                    let text = std::fs::read_to_string(&path).with_context(|| {
                        format!("judge.templates: reading template {}", path.display())
                    })?;
                    Template::parse(&path.display().to_string(), &text, kind)?
                }
            };
            templates.push((kind, t));
        }
        Ok(Self { templates })
    }

    pub fn get(&self, kind: TemplateKind) -> &Template {
        &self.templates.iter().find(|t| t.0 == kind).expect("all kinds loaded").1
    }

    /// The pairwise prompt for `c`; `labels` selects the label-probability variant.
    pub fn pairwise(&self, c: &Comparison<'_>, labels: Option<&Labels>) -> String {
        let criteria = c.criteria.filter(|s| !s.trim().is_empty());
        let kind = match (criteria.is_some(), labels.is_some()) {
            (false, false) => TemplateKind::Pairwise,
            (true, false) => TemplateKind::PairwiseCriteria,
            (false, true) => TemplateKind::PairwiseLabel,
            (true, true) => TemplateKind::PairwiseCriteriaLabel,
        };
        let (prompt, first, second) = (neutralise(c.prompt), neutralise(c.first), neutralise(c.second));
        let criteria = criteria.map(neutralise).unwrap_or_default();
        let mut values = vec![
            ("prompt", prompt.as_str()),
            ("criteria", criteria.as_str()),
            ("first", first.as_str()),
            ("second", second.as_str()),
        ];
        if let Some(l) = labels {
            values.extend([
                ("first_label", l.first.as_str()),
                ("second_label", l.second.as_str()),
                ("tie_label", l.tie.as_str()),
            ]);
        }
        self.get(kind).render(&values)
    }

    /// The pointwise (1-10) prompt for one answer.
    pub fn pointwise(&self, prompt: &str, criteria: Option<&str>, answer: &str) -> String {
        let criteria = criteria.filter(|s| !s.trim().is_empty());
        let kind = if criteria.is_some() { TemplateKind::PointwiseCriteria } else { TemplateKind::Pointwise };
        let (prompt, answer) = (neutralise(prompt), neutralise(answer));
        let criteria = criteria.map(neutralise).unwrap_or_default();
        self.get(kind).render(&[
            ("prompt", prompt.as_str()),
            ("criteria", criteria.as_str()),
            ("answer", answer.as_str()),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_templates_parse_and_render() {
        let t = Templates::builtin();
        let c = Comparison { prompt: "Write {first}", criteria: None, first: "one {second}", second: "two" };
        let s = t.pairwise(&c, None);
        // Single pass: braces inside values are not expanded again.
        assert!(s.contains("Write {first}") && s.contains("one {second}"));
        assert!(s.contains("<<<ANSWER A>>>\none {second}\n<<<END ANSWER A>>>"));
        let l = t.pairwise(&Comparison { criteria: Some("Be brief."), ..c }, Some(&Labels::default()));
        assert!(l.contains("Be brief.") && l.contains("one letter only: A if"));
        let p = t.pointwise("task", None, "ans");
        assert!(p.contains("<<<ANSWER>>>\nans\n<<<END ANSWER>>>"));
    }

    #[test]
    fn load_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        for kind in TemplateKind::ALL {
            std::fs::write(dir.path().join(kind.file_name()), kind.builtin()).unwrap();
        }
        Templates::load(Some(dir.path())).unwrap();
        let bad = dir.path().join("pairwise.txt");
        std::fs::write(&bad, "Task {prompt}\nA {first}\nB {second}\nlen {answer_length}\n").unwrap();
        let e = Templates::load(Some(dir.path())).unwrap_err().to_string();
        assert!(e.contains(&format!("{}:4: unknown placeholder {{answer_length}}", bad.display())), "{e}");
        std::fs::write(&bad, "Task {prompt}\nA {first}\n").unwrap();
        let e = Templates::load(Some(dir.path())).unwrap_err().to_string();
        assert!(e.contains("pairwise.txt") && e.contains("{second}"), "{e}");
        std::fs::write(&bad, "Task {prompt} {first} {second}\n{ oops\n").unwrap();
        let e = Templates::load(Some(dir.path())).unwrap_err().to_string();
        assert!(e.contains("pairwise.txt:2"), "{e}");
        std::fs::write(&bad, "{{literal}} {prompt} {first} {second}").unwrap();
        let t = Templates::load(Some(dir.path())).unwrap();
        let c = Comparison { prompt: "p", criteria: None, first: "a", second: "b" };
        assert_eq!(t.pairwise(&c, None), "{literal} p a b");
        std::fs::remove_file(dir.path().join("pointwise.txt")).unwrap();
        let e = format!("{:#}", Templates::load(Some(dir.path())).unwrap_err());
        assert!(e.contains("pointwise.txt"), "{e}");
    }
}
