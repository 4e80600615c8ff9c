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
    /// Several judges (`[[judge.panel.members]]`) whose rewards are combined per pair.
    Panel,
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
    /// `kind = "panel"`: the members and the quorum. Left out of the serialised config when
    /// empty, so a one-judge run's config hash is what it was before panels existed.
    #[serde(skip_serializing_if = "PanelConfig::is_empty")]
    pub panel: PanelConfig,
}

/// `[judge.panel]`: judges that each compare every pair; a pair's reward is the weighted mean of
/// the members that scored it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PanelConfig {
    /// Members that must score a pair for it to be scored (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quorum: Option<usize>,
    pub members: Vec<MemberConfig>,
}

impl PanelConfig {
    pub fn is_empty(&self) -> bool {
        self.quorum.is_none() && self.members.is_empty()
    }

    pub fn quorum(&self) -> usize {
        self.quorum.unwrap_or(1)
    }
}

/// `[[judge.panel.members]]`: a whole judge (the keys of `[judge]` but `panel`), with a name for
/// its metrics and a weight in the panel's mean.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemberConfig {
    /// Names its `judge/<name>/...` metrics and its lines in the samples log.
    pub name: String,
    pub weight: f64,
    pub kind: JudgeKind,
    pub mode: VerdictMode,
    pub templates: Option<PathBuf>,
    pub labels: Labels,
    pub tie_margin: f64,
    pub reask: bool,
    pub openai: OpenAiConfig,
    pub embedded: EmbeddedConfig,
}

impl Default for MemberConfig {
    fn default() -> Self {
        let j = JudgeConfig::default();
        Self {
            name: String::new(),
            weight: 1.0,
            kind: j.kind,
            mode: j.mode,
            templates: j.templates,
            labels: j.labels,
            tie_margin: j.tie_margin,
            reask: j.reask,
            openai: j.openai,
            embedded: j.embedded,
        }
    }
}

impl MemberConfig {
    /// The member as a judge of its own.
    pub fn judge(&self) -> JudgeConfig {
        JudgeConfig {
            kind: self.kind,
            mode: self.mode,
            templates: self.templates.clone(),
            labels: self.labels.clone(),
            tie_margin: self.tie_margin,
            reask: self.reask,
            openai: self.openai.clone(),
            embedded: self.embedded.clone(),
            panel: PanelConfig::default(),
        }
    }
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
            panel: PanelConfig::default(),
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
    /// Finished calls whose KV caches the judge keeps, so that a call sharing its start with
    /// one of them (the task, its criteria, often the reference) prefills only the rest. In
    /// label-probability mode the first call on a task runs before the others on it so they can
    /// reuse it. Verdicts are the same bits as without it; 0 turns it off. Memory: each kept
    /// call holds its KV cache on the judge's device (about 24 MB for SmolLM2-135M in f32).
    pub prefix_cache: usize,
}

/// Bound on `judge.embedded.prefix_cache`: every kept call holds a whole KV cache in memory.
pub const MAX_PREFIX_CACHE: usize = 1024;

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self { model: None, max_new_tokens: 512, max_num_seqs: 16, serial: false, prefix_cache: 16 }
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
        for m in &mut self.panel.members {
            if let Some(t) = &mut m.templates {
                if t.is_relative() {
                    *t = base.join(&*t);
                }
            }
            if let Some(e) = &mut m.embedded.model {
                if e.path.is_relative() {
                    e.path = base.join(&e.path);
                }
            }
        }
    }

    /// The OpenAI-endpoint judges this section names, with their config keys: itself, or a
    /// panel's `openai` members.
    pub fn endpoints(&self) -> Vec<(String, JudgeConfig)> {
        match self.kind {
            JudgeKind::Openai => vec![("judge".to_string(), self.clone())],
            JudgeKind::Embedded => vec![],
            JudgeKind::Panel => self
                .panel
                .members
                .iter()
                .enumerate()
                .filter(|(_, m)| m.kind == JudgeKind::Openai)
                .map(|(i, m)| (format!("judge.panel.members[{i}]"), m.judge()))
                .collect(),
        }
    }

    /// Pairs worth judging at once: enough to fill the judge (`both` makes two calls per pair;
    /// the judge's own semaphore does the limiting), or a panel's busiest member.
    pub fn pair_concurrency(&self) -> usize {
        match self.kind {
            JudgeKind::Openai => self.openai.max_concurrency * 2,
            JudgeKind::Embedded => self.embedded.max_num_seqs,
            JudgeKind::Panel => self.panel.members.iter().map(|m| m.judge().pair_concurrency()).max().unwrap_or(1),
        }
    }

    /// What this judge is, in a few words (for logs and summaries; never a key).
    pub fn describe(&self, policy: &ModelConfig) -> String {
        match self.kind {
            JudgeKind::Openai => format!("openai {} at {}", self.openai.model, self.openai.base_url),
            JudgeKind::Embedded => format!("embedded {}", self.embedded_model(policy).path.display()),
            JudgeKind::Panel => {
                let m: Vec<String> =
                    self.panel.members.iter().map(|m| format!("{} (weight {}: {})", m.name, m.weight, m.judge().describe(policy))).collect();
                format!("panel of {}, quorum {}: {}", m.len(), self.panel.quorum(), m.join(", "))
            }
        }
    }

    pub fn is_panel(&self) -> bool {
        self.kind == JudgeKind::Panel
    }

    /// Whether judge tokens have a price: this judge's, or (a panel) at least one member's.
    pub fn priced(&self) -> bool {
        if self.is_panel() {
            self.panel.members.iter().any(|m| m.openai.prices().is_some())
        } else {
            self.openai.prices().is_some()
        }
    }

    /// What `usage` (all members' tokens) and `by_member` (each member's) cost: this judge's
    /// prices, or for a panel the sum over its priced members; None without any price.
    pub fn cost(&self, usage: &super::Usage, by_member: &dyn Fn(&str) -> super::Usage) -> Option<f64> {
        if !self.is_panel() {
            return self.openai.cost(usage);
        }
        let costs: Vec<f64> = self.panel.members.iter().filter_map(|m| m.openai.cost(&by_member(&m.name))).collect();
        (!costs.is_empty()).then(|| costs.iter().sum())
    }

    fn validate_panel(&self, key: &str, p: &mut Problems) {
        let members = &self.panel.members;
        if !self.is_panel() {
            if !self.panel.is_empty() {
                p.push(&format!("{key}.panel"), format!("is set but {key}.kind is {:?}; set {key}.kind = \"panel\" to use it", self.kind));
            }
            return;
        }
        if members.is_empty() {
            p.push(&format!("{key}.panel.members"), "a panel needs at least one member ([[judge.panel.members]])");
            return;
        }
        let quorum = self.panel.quorum();
        if !(1..=members.len()).contains(&quorum) {
            p.push(&format!("{key}.panel.quorum"), format!("must be in 1..={} (the number of members), got {quorum}", members.len()));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, m) in members.iter().enumerate() {
            let mk = format!("{key}.panel.members[{i}]");
            let ok_name = !m.name.is_empty() && m.name.len() <= 64 && m.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok_name {
                p.push(&format!("{mk}.name"), format!("must be 1-64 letters, digits, '-', '_' or '.' (it names the member's metrics), got {:?}", m.name));
            } else if !names.insert(m.name.as_str()) {
                p.push(&format!("{mk}.name"), format!("{:?} names two members", m.name));
            }
            if !m.weight.is_finite() || m.weight < 0.0 {
                p.push(&format!("{mk}.weight"), format!("must be finite and >= 0, got {}", m.weight));
            }
            if m.kind == JudgeKind::Panel {
                p.push(&format!("{mk}.kind"), "a member must be \"openai\" or \"embedded\" (panels do not nest)");
            }
            m.judge().validate(&mk, p);
        }
        if members.iter().all(|m| m.weight == 0.0) {
            p.push(&format!("{key}.panel.members"), "every member weighs 0: at least one weight must be > 0");
        }
    }

    /// The embedded judge's model: its own, or the policy's.
    pub fn embedded_model(&self, policy: &ModelConfig) -> ModelConfig {
        self.embedded.model.clone().unwrap_or_else(|| policy.clone())
    }

    pub fn validate(&self, key: &str, p: &mut Problems) {
        self.validate_panel(key, p);
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
        if self.embedded.prefix_cache > MAX_PREFIX_CACHE {
            p.push(
                &format!("{key}.embedded.prefix_cache"),
                &format!("must be <= {MAX_PREFIX_CACHE} (each kept call holds its KV cache), got {}", self.embedded.prefix_cache),
            );
        }
    }
}

