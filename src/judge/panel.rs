//! The judges a run asks: one, or a panel (`[judge] kind = "panel"`) whose members each compare
//! every pair. How members' rewards combine is the reward module's business; this
//! holds the members and says whether enough of them can answer.

use std::sync::Arc;

use anyhow::{Context, Result};

use super::{EmbeddedJudge, Judge, JudgeConfig, JudgeHealth, JudgeKind, OpenAiJudge};
use crate::model::ModelConfig;

pub struct Member {
    pub name: String,
    pub weight: f64,
    pub judge: Arc<dyn Judge>,
}

pub struct Panel {
    pub members: Vec<Member>,
    /// Members that must score a pair for it to be scored.
    pub quorum: usize,
    /// One judge (not `kind = "panel"`): its rewards pass through unchanged, without a member
    /// breakdown.
    pub single: bool,
}

impl Panel {
    /// One judge standing alone.
    pub fn single(judge: Arc<dyn Judge>) -> Self {
        Self { members: vec![Member { name: "judge".into(), weight: 1.0, judge }], quorum: 1, single: true }
    }

    /// The judge or panel `[judge]` describes; `policy` is the `[model]` section, used by an
    /// embedded judge that has no model of its own.
    pub async fn from_config(cfg: &JudgeConfig, policy: &ModelConfig) -> Result<Self> {
        if cfg.kind != JudgeKind::Panel {
            return Ok(Self::single(one(cfg, policy).await?));
        }
        let mut members = Vec::with_capacity(cfg.panel.members.len());
        for (i, m) in cfg.panel.members.iter().enumerate() {
            let judge = one(&m.judge(), policy)
                .await
                .with_context(|| format!("judge.panel.members[{i}] ({:?})", m.name))?;
            members.push(Member { name: m.name.clone(), weight: m.weight, judge });
        }
        Ok(Self { members, quorum: cfg.panel.quorum(), single: false })
    }

    /// Up while at least `quorum` members are; otherwise down, naming the members that are.
    pub fn health(&self) -> JudgeHealth {
        let down: Vec<(&Member, u32, String, f64)> = self
            .members
            .iter()
            .filter_map(|m| match m.judge.health() {
                JudgeHealth::Up => None,
                JudgeHealth::Down { consecutive_failures, last_error, retry_in_secs } => {
                    Some((m, consecutive_failures, last_error, retry_in_secs))
                }
            })
            .collect();
        if self.members.len() - down.len() >= self.quorum {
            return JudgeHealth::Up;
        }
        if self.single {
            let (_, consecutive_failures, last_error, retry_in_secs) = down.into_iter().next().expect("a down judge");
            return JudgeHealth::Down { consecutive_failures, last_error, retry_in_secs };
        }
        let why: Vec<String> = down.iter().map(|(m, n, e, _)| format!("member {:?} ({n} consecutive failures, last: {e})", m.name)).collect();
        JudgeHealth::Down {
            consecutive_failures: down.iter().map(|d| d.1).max().unwrap_or(0),
            last_error: format!(
                "{} of {} panel members up, quorum {}; {}",
                self.members.len() - down.len(),
                self.members.len(),
                self.quorum,
                why.join("; ")
            ),
            // The first member back may restore the quorum.
            retry_in_secs: down.iter().map(|d| d.3).fold(f64::INFINITY, f64::min),
        }
    }

    /// The one judge of a panel of one; commands that take a single judge (`select`) ask for it.
    pub fn only(&self) -> Option<&Arc<dyn Judge>> {
        self.single.then(|| &self.members[0].judge)
    }
}

async fn one(cfg: &JudgeConfig, policy: &ModelConfig) -> Result<Arc<dyn Judge>> {
    Ok(match cfg.kind {
        JudgeKind::Openai => Arc::new(OpenAiJudge::new(cfg)?),
        JudgeKind::Embedded => Arc::new(EmbeddedJudge::load(cfg, &cfg.embedded_model(policy)).await?),
        JudgeKind::Panel => anyhow::bail!("judge.kind: a panel member cannot itself be a panel"),
    })
}
