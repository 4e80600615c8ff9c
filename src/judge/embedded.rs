//! [`Judge`] on a model inside this process: a second mistral.rs model (or the policy's own
//! base weights, loaded again and never updated).
//!
//! `generate` mode decodes greedily and parses the reply like any other judge's.
//! `label-probability` mode asks for the bare label and reads the logits at the first generated
//! position through a per-request logits processor; the verdict probabilities are the softmax
//! of those logits restricted to the three label tokens. Labels must be single tokens of the
//! judge's tokenizer, which [`EmbeddedJudge::load`] checks.
//!
//! Calls on one task share most of their prompt (the task, its criteria, often the reference)
//! and differ only in the answers, which are short next to it. With `judge.embedded.prefix_cache`
//! the engine keeps finished calls' KV caches and a later call prefills only what follows the
//! longest start it shares with one of them. The engine looks when a call arrives, so calls sent
//! together would all miss: in label-probability mode, where a call is one prefill, [`WarmGate`]
//! lets the first call on a task run before the rest. Generated replies are not held back (a
//! first call decoding hundreds of tokens would stall the others); their later calls still hit.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use either::Either;
use mistralrs::{CustomLogitsProcessor, RequestBuilder, Tensor, TextMessageRole};

use super::templates::Templates;
use super::verdict::{self, Labels};
use super::{Comparison, Judge, JudgeConfig, JudgeOutput, Judgement, RatingOutput, Usage, VerdictMode};
use crate::model::ModelConfig;
use crate::engine::{EngineConfig, MistralEngine};

/// Captures the full logits of the first position it is called at, passing them through.
#[derive(Default)]
pub struct FirstLogits {
    captured: Mutex<Option<(usize, Vec<f32>)>>,
}

impl FirstLogits {
    pub fn take(&self) -> Option<Vec<f32>> {
        self.captured.lock().unwrap().take().map(|c| c.1)
    }
}

impl CustomLogitsProcessor for FirstLogits {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> mistralrs::Result<Tensor> {
        let mut slot = self.captured.lock().unwrap();
        // The engine may call twice at one position; later positions are not the label's.
        if slot.as_ref().is_none_or(|(pos, _)| context.len() <= *pos) {
            let values: Vec<f32> = logits
                .to_dtype(mistralrs::DType::F32)?
                .to_device(&mistralrs::Device::Cpu)?
                .flatten_all()?
                .to_vec1()?;
            *slot = Some((context.len(), values));
        }
        Ok(logits.clone())
    }
}

/// (hits, prompt tokens reused) of every embedded judge's prefix cache in this process so far.
/// The policy's engine keeps no prefix cache, so these are the judges'.
pub fn prefix_cache_reuse() -> (u64, u64) {
    mistralrs_core::prefix_cache_reuse()
}

/// The CLI's line on prefix reuse so far; None when no call reused anything.
pub fn prefix_cache_summary() -> Option<String> {
    let (hits, reused) = prefix_cache_reuse();
    (hits > 0).then(|| format!("judge prefix cache: {hits} calls reused {reused} prompt tokens of earlier calls"))
}

/// Holds back the calls on a task until its first call has finished and left its prefix in the
/// engine's cache. For one-token calls this costs next to nothing: mistral.rs 0.8.1 prefills
/// prompts of different lengths one at a time anyway.
#[derive(Default)]
struct WarmGate {
    tasks: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<bool>>>>,
}

impl WarmGate {
    /// Past this many tasks the gate forgets them all: a forgotten task's next call just runs
    /// first again.
    const MAX_TASKS: usize = 4096;

    /// Some(guard) for the first call on `task`: hold it until the call has finished, then
    /// [`WarmGate::done`]. None once the task is warm.
    /// `task`: the task's prompt and its criteria (what its calls share).
    async fn enter(&self, task: (&str, Option<&str>)) -> Option<tokio::sync::OwnedMutexGuard<bool>> {
        let mut h = DefaultHasher::new();
        task.hash(&mut h);
        let cell = {
            let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
            if tasks.len() >= Self::MAX_TASKS {
                tasks.clear();
            }
            tasks.entry(h.finish()).or_default().clone()
        };
        let guard = cell.lock_owned().await;
        (!*guard).then_some(guard)
    }

    /// Marks the task warm whether or not its first call succeeded: a failure must not hold
    /// back the others.
    fn done(guard: Option<tokio::sync::OwnedMutexGuard<bool>>) {
        if let Some(mut g) = guard {
            *g = true;
        }
    }
}

pub struct EmbeddedJudge {
    engine: MistralEngine,
    /// None without a prefix cache.
    gate: Option<WarmGate>,
    templates: Templates,
    labels: Labels,
    /// Token ids of (first, second, tie) labels, in label-probability mode.
    label_ids: Option<[u32; 3]>,
    tie_margin: f64,
    reask: bool,
    max_new_tokens: usize,
}

impl EmbeddedJudge {
    pub async fn load(judge: &JudgeConfig, model: &ModelConfig) -> Result<Self> {
        // Calls in flight (both orders of a pair, all pairs the caller submits together) are
        // decoded as one batch of up to `max_num_seqs`.
        let engine_cfg = EngineConfig {
            max_num_seqs: judge.embedded.max_num_seqs,
            serial: judge.embedded.serial,
            prefix_cache: judge.embedded.prefix_cache,
            ..Default::default()
        };
        let engine = MistralEngine::load(model, &engine_cfg)
            .await
            .with_context(|| format!("loading the embedded judge model {}", model.path.display()))?;
        let templates = Templates::load(judge.templates.as_deref())?;
        let label_ids = match judge.mode {
            VerdictMode::Generate => None,
            VerdictMode::LabelProbability => Some(label_token_ids(&engine, &judge.labels).await?),
        };
        Ok(Self {
            engine,
            gate: (judge.embedded.prefix_cache > 0 && label_ids.is_some()).then(WarmGate::default),
            templates,
            labels: judge.labels.clone(),
            label_ids,
            tie_margin: judge.tie_margin,
            reask: judge.reask,
            max_new_tokens: judge.embedded.max_new_tokens,
        })
    }

    pub fn engine(&self) -> &MistralEngine {
        &self.engine
    }

    /// (first, second, tie) label token ids; None in generate mode.
    pub fn label_ids(&self) -> Option<[u32; 3]> {
        self.label_ids
    }

    fn request(messages: &[(TextMessageRole, String)], max_len: usize) -> RequestBuilder {
        let mut r = RequestBuilder::new();
        for (role, text) in messages {
            r = r.add_message(role.clone(), text);
        }
        r.set_sampler_max_len(max_len)
    }

    /// Asks `prompt`, parses the reply, and on a parse failure (when re-asking is on) asks once
    /// more with `reask` in the same conversation. Returns the parse or the reason it failed,
    /// every reply for the samples log, and the tokens of every ask.
    async fn ask<T>(
        &self,
        prompt: String,
        reask: &str,
        parse: impl Fn(&str) -> std::result::Result<T, String>,
    ) -> (std::result::Result<T, String>, String, Usage) {
        let join = |raw: &[String]| raw.join("\n--- re-ask ---\n");
        let mut messages = vec![(TextMessageRole::User, prompt)];
        let mut raw = Vec::new();
        let mut usage = Usage::default();
        let asks = if self.reask { 2 } else { 1 };
        let mut why = String::new();
        for ask in 0..asks {
            let text = match self.generate(&messages).await {
                Ok((t, u)) => {
                    usage.add(u);
                    t
                }
                Err(e) => return (Err(format!("{e:#}")), join(&raw), usage),
            };
            raw.push(text.clone());
            match parse(&text) {
                Ok(v) => return (Ok(v), join(&raw), usage),
                Err(f) => why = f,
            }
            if ask + 1 < asks {
                messages.push((TextMessageRole::Assistant, text));
                messages.push((TextMessageRole::User, reask.to_string()));
            }
        }
        let reason = if self.reask { format!("{why} (after one re-ask)") } else { why };
        (Err(reason), join(&raw), usage)
    }

    /// The reply's text and its tokens: the prompt ids the engine tokenised (chat template
    /// included) and the ids it generated, as mistral.rs counts them for the sequence.
    async fn generate(&self, messages: &[(TextMessageRole, String)]) -> Result<(String, Usage)> {
        let resp = self
            .engine
            .send(Self::request(messages, self.max_new_tokens))
            .await
            .context("embedded judge generation failed")?;
        let usage = usage_of(&resp.usage);
        let choice = resp.choices.into_iter().next().context("embedded judge returned no choice")?;
        Ok((choice.message.content.unwrap_or_default(), usage))
    }

    /// Label probabilities at the first generated position, the label the engine emitted, and
    /// the tokens of the call.
    async fn label_probs(&self, prompt: &str, ids: [u32; 3]) -> Result<(super::LabelProbs, String, Usage)> {
        let capture = Arc::new(FirstLogits::default());
        let req = Self::request(&[(TextMessageRole::User, prompt.to_string())], 1)
            .add_logits_processor(capture.clone());
        let resp = self.engine.send(req).await.context("embedded judge forward failed")?;
        let usage = usage_of(&resp.usage);
        let text = resp
            .choices
            .into_iter()
            .next()
            .and_then(|c| c.message.content)
            .unwrap_or_default();
        let logits = capture.take().context("the logits processor saw no position")?;
        let pick = |id: u32| -> Result<f32> {
            logits.get(id as usize).copied().with_context(|| {
                format!("label token {id} is outside the judge's vocabulary of {}", logits.len())
            })
        };
        Ok((verdict::softmax3([pick(ids[0])?, pick(ids[1])?, pick(ids[2])?]), text, usage))
    }
}

/// The engine's token counts of one finished request.
fn usage_of(u: &mistralrs::Usage) -> Usage {
    Usage { prompt_tokens: u.prompt_tokens as u64, completion_tokens: u.completion_tokens as u64, usage_missing: 0 }
}

/// Resolves the three labels to single token ids with the judge's own tokenizer.
pub async fn label_token_ids(engine: &MistralEngine, labels: &Labels) -> Result<[u32; 3]> {
    let mut ids = [0u32; 3];
    for (i, (name, label)) in [("first", &labels.first), ("second", &labels.second), ("tie", &labels.tie)]
        .into_iter()
        .enumerate()
    {
        let toks = engine
            .raw()
            .tokenize(Either::Right(label.clone()), None, false, false, None)
            .await
            .map_err(|e| anyhow::anyhow!("tokenizing judge label {label:?}: {e}"))?;
        if toks.len() != 1 {
            bail!(
                "judge.labels.{name}: label {label:?} is {} tokens ({toks:?}) in the judge model's \
                 tokenizer; label-probability mode needs single-token labels",
                toks.len()
            );
        }
        ids[i] = toks[0];
    }
    if ids[0] == ids[1] || ids[0] == ids[2] || ids[1] == ids[2] {
        bail!("judge.labels: two labels map to the same token ({ids:?})");
    }
    Ok(ids)
}

fn ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

impl EmbeddedJudge {
    async fn enter(&self, prompt: &str, criteria: Option<&str>) -> Option<tokio::sync::OwnedMutexGuard<bool>> {
        match &self.gate {
            Some(g) => g.enter((prompt, criteria)).await,
            None => None,
        }
    }

    async fn compare_warm(&self, c: Comparison<'_>, start: Instant) -> JudgeOutput {
        if let Some(ids) = self.label_ids {
            // Always parseable: one forward pass, probabilities of the three labels.
            let prompt = self.templates.pairwise(&c, Some(&self.labels));
            return match self.label_probs(&prompt, ids).await {
                Ok((p, text, usage)) => JudgeOutput {
                    judgement: Judgement::Scored {
                        verdict: verdict::verdict_from_probs(&p, self.tie_margin),
                        probs: Some(p),
                    },
                    raw: text,
                    latency_ms: ms(start),
                    retries: 0,
                    usage,
                },
                Err(e) => JudgeOutput::unscored(format!("{e:#}"), String::new(), ms(start), 0),
            };
        }
        let prompt = self.templates.pairwise(&c, None);
        let reask = "Reply with the verdict tag only: [[A]], [[B]] or [[TIE]].";
        let (parsed, raw, usage) = self.ask(prompt, reask, |t| verdict::parse_verdict(t).map_err(|f| f.to_string())).await;
        match parsed {
            Ok(v) => JudgeOutput {
                judgement: Judgement::Scored { verdict: v, probs: None },
                raw,
                latency_ms: ms(start),
                retries: 0,
                usage,
            },
            Err(reason) => JudgeOutput::unscored(reason, raw, ms(start), 0).with_usage(usage),
        }
    }
}

#[async_trait]
impl Judge for EmbeddedJudge {
    async fn compare(&self, c: Comparison<'_>) -> JudgeOutput {
        // Latency counts the wait at the gate: it is part of what the caller waited for.
        let start = Instant::now();
        let guard = self.enter(c.prompt, c.criteria).await;
        let out = self.compare_warm(c, start).await;
        WarmGate::done(guard);
        out
    }

    async fn rate(&self, prompt: &str, criteria: Option<&str>, answer: &str) -> RatingOutput {
        let start = Instant::now();
        let reask = "Reply with the score tag only, for example [[SCORE: 6]].";
        let prompt = self.templates.pointwise(prompt, criteria, answer);
        let (parsed, raw, usage) = self.ask(prompt, reask, |t| verdict::parse_score(t).map_err(|f| f.to_string())).await;
        let (score, reason) = match parsed {
            Ok(s) => (Some(s), None),
            Err(reason) => (None, Some(reason)),
        };
        RatingOutput { score, reason, raw, latency_ms: ms(start), retries: 0, usage }
    }
}
