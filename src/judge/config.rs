//! The `[judge]` config section.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::verdict::Labels;
use crate::model::ModelConfig;
use crate::validate::Problems;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JudgeKind {
    /// Any OpenAI-compatible `/v1/chat/completions` endpoint.
    #[default]
    Openai,
    /// A second model inside this process (mistral.rs).
    Embedded,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerdictMode {
    /// Brief reasoning, then a `[[A]]`/`[[B]]`/`[[TIE]]` tag.
    #[default]
    Generate,
    /// The bare label; its probabilities are read at that position.
    LabelProbability,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JudgeConfig {
    pub kind: JudgeKind,
    pub mode: VerdictMode,
    /// Directory of replacement templates (same file names as `prompts/`); None = built-in.
    pub templates: Option<PathBuf>,
    /// Label-probability mode: the labels the judge answers with.
    pub labels: Labels,
    /// Label-probability mode: a tie when |P(first) - P(second)| is below this.
    pub tie_margin: f64,
    /// Ask once more when a reply has no parseable verdict.
    pub reask: bool,
    pub openai: OpenAiConfig,
    pub embedded: EmbeddedConfig,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        Self {
            kind: JudgeKind::default(),
            mode: VerdictMode::default(),
            templates: None,
            labels: Labels::default(),
            tie_margin: 0.0,
            reask: true,
            openai: OpenAiConfig::default(),
            embedded: EmbeddedConfig::default(),
        }
    }
}

/// An OpenAI-compatible endpoint. The API key is read from the environment variable named by
/// `api_key_env` and never stored here.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// Up to and including `/v1`, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    pub model: String,
    /// Name of the environment variable holding the key; empty = send no Authorization header.
    pub api_key_env: String,
    pub temperature: f64,
    pub max_tokens: u32,
    /// Whole-request timeout (connect, send, answer).
    pub timeout_secs: f64,
    /// Requests in flight at once, enforced by a semaphore.
    pub max_concurrency: usize,
    /// Retries after the first attempt for retryable failures (5xx, 429, timeouts, resets).
    pub max_retries: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// A Retry-After longer than this gives up instead of waiting.
    pub max_retry_after_secs: f64,
    /// Consecutive failed calls that open the circuit breaker (0 = never).
    pub breaker_failures: u32,
    /// How long the open breaker refuses calls before letting one probe through.
    pub breaker_cooldown_secs: f64,
    /// Label-probability mode: alternatives requested per position.
    pub top_logprobs: u32,
    /// Price of a million prompt / completion tokens (any currency; both or neither): each step
    /// then logs `judge_cost` and `judge_cost_total`, and `run.max_judge_cost` can be set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_prompt_per_mtok: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_completion_per_mtok: Option<f64>,
}

impl OpenAiConfig {
    /// (prompt, completion) price per million tokens, when both are set.
    pub fn prices(&self) -> Option<(f64, f64)> {
        Some((self.price_prompt_per_mtok?, self.price_completion_per_mtok?))
    }

    /// What `usage` cost at [`OpenAiConfig::prices`]; None without prices.
    pub fn cost(&self, usage: &super::Usage) -> Option<f64> {
        let (p, c) = self.prices()?;
        Some((usage.prompt_tokens as f64 * p + usage.completion_tokens as f64 * c) / 1e6)
    }
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".into(),
            model: "gpt-4o-mini".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            temperature: 0.0,
            max_tokens: 1024,
            timeout_secs: 120.0,
            max_concurrency: 16,
            max_retries: 5,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            max_retry_after_secs: 120.0,
            breaker_failures: 20,
            breaker_cooldown_secs: 60.0,
            top_logprobs: 20,
            price_prompt_per_mtok: None,
            price_completion_per_mtok: None,
        }
    }
}

/// A judge model inside this process. Without `model`, the policy's own base weights
/// (`[model]`) are loaded a second time and never updated.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    pub model: Option<ModelConfig>,
    /// Generate mode: reply length.
    pub max_new_tokens: usize,
    /// Judge calls decoded together in one batch (both orders of a pair, every pair of a step).
    pub max_num_seqs: usize,
    /// One call at a time, for bit-for-bit reproducible verdicts (see `engine.serial`).
    pub serial: bool,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self { model: None, max_new_tokens: 512, max_num_seqs: 16, serial: false }
    }
}

impl JudgeConfig {
    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(t) = &mut self.templates {
            if t.is_relative() {
                *t = base.join(&*t);
            }
        }
        if let Some(m) = &mut self.embedded.model {
            if m.path.is_relative() {
                m.path = base.join(&m.path);
            }
        }
    }

    /// The embedded judge's model: its own, or the policy's.
    pub fn embedded_model(&self, policy: &ModelConfig) -> ModelConfig {
        self.embedded.model.clone().unwrap_or_else(|| policy.clone())
    }

    pub fn validate(&self, key: &str, p: &mut Problems) {
        let o = &self.openai;
        let k = |s: &str| format!("{key}.openai.{s}");
        if self.kind == JudgeKind::Openai {
            let creds = reqwest::Url::parse(&o.base_url).is_ok_and(|u| !u.username().is_empty() || u.password().is_some());
            if creds {
                // A URL is printed in logs and errors; a key belongs in api_key_env.
                p.push(&k("base_url"), "must not carry credentials (user:password@); put the key in the environment variable named by api_key_env");
            } else if !(o.base_url.starts_with("http://") || o.base_url.starts_with("https://")) {
                p.push(&k("base_url"), format!("must start with http:// or https://, got {:?}", o.base_url));
            }
            if o.model.trim().is_empty() {
                p.push(&k("model"), "must not be empty");
            }
        }
        if o.api_key_env.chars().any(|c| !(c.is_ascii_alphanumeric() || c == '_')) {
            p.push(&k("api_key_env"), "must be the NAME of an environment variable (letters, digits, _), not the key");
        }
        p.at_least(&k("temperature"), o.temperature, 0.0);
        p.seconds(&k("timeout_secs"), o.timeout_secs, 0.001);
        p.positive(&k("max_tokens"), o.max_tokens as f64);
        p.positive(&k("max_concurrency"), o.max_concurrency as f64);
        p.millis(&k("backoff_initial_ms"), o.backoff_initial_ms, 1);
        p.millis(&k("backoff_max_ms"), o.backoff_max_ms, 1);
        if o.backoff_max_ms < o.backoff_initial_ms {
            p.push(&k("backoff_max_ms"), format!("must be >= backoff_initial_ms ({}), got {}", o.backoff_initial_ms, o.backoff_max_ms));
        }
        p.seconds(&k("max_retry_after_secs"), o.max_retry_after_secs, 0.0);
        p.seconds(&k("breaker_cooldown_secs"), o.breaker_cooldown_secs, 0.0);
        let prices = [("price_prompt_per_mtok", o.price_prompt_per_mtok), ("price_completion_per_mtok", o.price_completion_per_mtok)];
        for (name, v) in prices {
            if let Some(v) = v {
                p.at_least(&k(name), v, 0.0);
            }
        }
        if let [(set, Some(_)), (unset, None)] | [(unset, None), (set, Some(_))] = prices {
            p.push(&k(unset), format!("must be set with {} (0 for free tokens)", k(set)));
        }
        if !(1..=20).contains(&o.top_logprobs) {
            p.push(&k("top_logprobs"), format!("must be in 1..=20, got {}", o.top_logprobs));
        }
        if p.finite(&format!("{key}.tie_margin"), self.tie_margin) && !(0.0..1.0).contains(&self.tie_margin) {
            p.push(&format!("{key}.tie_margin"), format!("must be in [0, 1), got {}", self.tie_margin));
        }
        let l = &self.labels;
        for (name, v) in [("first", &l.first), ("second", &l.second), ("tie", &l.tie)] {
            if v.trim().is_empty() {
                p.push(&format!("{key}.labels.{name}"), "must not be empty");
            }
        }
        if l.first.trim().eq_ignore_ascii_case(l.second.trim())
            || l.first.trim().eq_ignore_ascii_case(l.tie.trim())
            || l.second.trim().eq_ignore_ascii_case(l.tie.trim())
        {
            p.push(&format!("{key}.labels"), "the three labels must differ");
        }
        if self.embedded.max_new_tokens == 0 {
            p.push(&format!("{key}.embedded.max_new_tokens"), "must be >= 1, got 0");
        }
        if self.embedded.max_num_seqs == 0 {
            p.push(&format!("{key}.embedded.max_num_seqs"), "must be >= 1, got 0");
        }
    }
}

