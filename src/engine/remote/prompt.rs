//! Chat prompts templated and tokenised here, as mistral.rs 0.8.1 does it for the embedded
//! engine (so both engines send the same prompt ids): the model directory's chat template
//! (`tokenizer_config.json`'s `chat_template`, or `chat_template.jinja`) rendered with minijinja
//! (Python string methods, trimmed blocks, `add_generation_prompt`, the special tokens, today's
//! `date_string`, `enable_thinking`), then `tokenizer.json` with its special-token post-processing.

use std::path::Path;

use anyhow::{bail, Context, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::engine::{ChatMessage, Role};

pub struct PromptTemplate {
    env: Environment<'static>,
    bos: Option<String>,
    eos: Option<String>,
    unk: Option<String>,
    tokenizer: Tokenizer,
}

/// A special token in tokenizer_config.json: a string or an AddedToken object.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

fn raise_exception(msg: String) -> std::result::Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: String) -> std::result::Result<String, Error> {
    Ok(chrono::Utc::now().format(&fmt).to_string())
}

/// HF's `tojson`: JSON with `<`, `>`, `&` and `'` escaped.
fn tojson(value: minijinja::Value, kwargs: minijinja::value::Kwargs) -> std::result::Result<minijinja::Value, Error> {
    let err = |e: serde_json::Error| Error::new(ErrorKind::BadSerialization, "cannot serialize to JSON").with_source(e);
    let indent: Option<usize> = kwargs.get("indent")?;
    let s = match indent {
        Some(n) => {
            let mut buf = Vec::new();
            let pad = b" ".repeat(n);
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            serde::Serialize::serialize(&value, &mut ser).map_err(err)?;
            String::from_utf8(buf).map_err(|e| Error::new(ErrorKind::BadSerialization, "JSON is not UTF-8").with_source(e))?
        }
        None => serde_json::to_string(&value).map_err(err)?,
    };
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\'' => out.push_str("\\u0027"),
            _ => out.push(c),
        }
    }
    Ok(minijinja::Value::from_safe_string(out))
}

/// The template text mistral.rs renders: Python slicing and negative ranges rewritten.
fn normalise(template: &str) -> String {
    let mut t = template.replace("[::-1]", "|reverse");
    let re = regex::Regex::new(r"range\((?P<expr>[^,]+),\s*-1,\s*-1\)").expect("valid regex");
    t = re.replace_all(&t, |c: &regex::Captures| format!("range({})|reverse", &c["expr"])).into_owned();
    if t.contains("{{ meta }}") {
        t = t.replace("{%- set meta = message.get(\"metadata\", \"\") %}", "").replace("{{ meta }}", "");
    }
    if t.contains("{% generation %}") && t.contains("{% endgeneration %}") {
        t = t.replace("{% generation %}", "").replace("{% endgeneration %}", "");
    }
    t
}

fn role(r: Role) -> &'static str {
    match r {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

impl PromptTemplate {
    /// Reads the tokenizer and chat template of the HF model directory `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let tp = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tp).map_err(|e| anyhow::anyhow!("reading {}: {e}", tp.display()))?;
        let cp = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read(&cp) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", cp.display()))?,
            Err(_) => Value::Null,
        };
        let template = match cfg.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string))
                .with_context(|| format!("{}: chat_template list has no \"default\" template", cp.display()))?,
            _ => {
                let jp = dir.join("chat_template.jinja");
                std::fs::read_to_string(&jp)
                    .with_context(|| format!("model directory {} has no chat template ({} has none, no {})", dir.display(), cp.display(), jp.display()))?
            }
        };
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_lstrip_blocks(true);
        env.set_trim_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", normalise(&template)).with_context(|| format!("parsing the chat template of {}", dir.display()))?;
        Ok(Self {
            env,
            bos: token_str(cfg.get("bos_token")),
            eos: token_str(cfg.get("eos_token")),
            unk: token_str(cfg.get("unk_token")),
            tokenizer,
        })
    }

    /// The prompt text with the generation prompt appended.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let msgs: Vec<Value> = messages.iter().map(|m| serde_json::json!({"role": role(m.role), "content": m.content})).collect();
        let tmpl = self.env.get_template("chat")?;
        let date_string = chrono::Utc::now().format("%d, %B, %Y").to_string();
        let out = tmpl.render(context! {
            messages => msgs,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
            unk_token => self.unk,
            date_string => date_string,
            enable_thinking => true,
            reasoning_effort => "medium",
        });
        out.context("rendering the chat template")
    }

    /// Prompt ids of `messages`, as the embedded engine computes them.
    pub fn encode(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.render(messages)?;
        let enc = self.tokenizer.encode_fast(text, true).map_err(|e| anyhow::anyhow!("tokenising the prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Vocabulary size including added tokens: every valid id is below it.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The text of `ids` with special tokens skipped; an error if the tokenizer cannot decode them.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self.tokenizer.decode(ids, true) {
            Ok(t) => Ok(t),
            Err(e) => bail!("ids do not decode: {e}"),
        }
    }
}
