//! Starting a run: the judge, the learner (restored from a checkpoint), the engine on the weights
//! the checkpoint says it served, and the repairs a resume after a crash needs.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use super::offpolicy::Pending;
use super::record::StepRecord;
use super::state::{self, TrainerState};
use super::sync::{self, Served};
use super::{install_signals, on_learner, Bars, Prepared, Trainer};
use crate::checkpoint::Checkpoints;
use crate::curriculum::Curriculum;
use crate::data::TaskSampler;
use crate::engine::remote::RemoteEngine;
use crate::engine::{Backend, Engine, MistralEngine, WeightFormat};
use crate::learner::Learner;
use crate::metrics::MetricsWriter;
use crate::rundir::{config_hash, LEARNER_DIR, POLICY_DIR};

impl Trainer {
    /// Loads the judge, the learner (restored from the checkpoint) and the engine on the weights
    /// the checkpoint says it served.
    pub async fn start(p: Prepared) -> Result<Self> {
        let Prepared { cfg, tasks, run, checkpoint, .. } = p;
        let hash = config_hash(&cfg)?;
        let judge = Arc::new(crate::judge::Panel::from_config(&cfg.judge, &cfg.model).await?);
        let saved = match &checkpoint {
            Some(d) => Some(TrainerState::read(d)?),
            None => None,
        };

        let t0 = Instant::now();
        let (lcfg, model_dir, seed) = (cfg.learner.clone(), cfg.model.path.clone(), cfg.run.seed);
        let ckpt_learner = checkpoint.as_ref().map(|d| d.join(LEARNER_DIR));
        let learner = tokio::task::spawn_blocking(move || -> Result<Learner> {
            let mut l = Learner::new(&lcfg, &model_dir, seed)?;
            if let Some(d) = ckpt_learner {
                l.load(&d).with_context(|| format!("restoring the learner from {}", d.display()))?;
            }
            Ok(l)
        })
        .await
        .context("learner thread panicked")??;
        eprintln!("learner ready in {:.1}s", t0.elapsed().as_secs_f64());

        let pending_step = saved.as_ref().and_then(|s| s.pending);
        let (curriculum, sampler, step, dirty, served_step) = match (&saved, &checkpoint) {
            (Some(s), Some(_)) => (
                Curriculum::restore_for(&cfg.curriculum, &tasks, s.curriculum.clone(), cfg.reward.reference)?,
                TaskSampler::resume(s.sampler, tasks.len(), cfg.run.shuffle)?,
                s.step,
                s.dirty,
                s.served_step,
            ),
            _ => (
                Curriculum::new_for(&cfg.curriculum, &tasks, cfg.reward.reference)?,
                TaskSampler::new(tasks.len(), cfg.run.seed, cfg.run.shuffle)?,
                0,
                false,
                0,
            ),
        };
        // The weights the engine served when the checkpoint was written.
        let format = sync::weight_format(&cfg);
        let policy_root = sync::export_root(&cfg, &run);
        sync::clean(&policy_root, None)?;
        let mut learner = Some(learner);
        let served = if served_step == 0 || format == WeightFormat::Nothing {
            Served { path: cfg.model.path.clone(), step: 0, owned: false }
        } else {
            let dir = sync::export_path(&cfg, &policy_root, served_step);
            let ckpt = checkpoint.as_ref().expect("served_step > 0 comes from a checkpoint");
            if ckpt.join(POLICY_DIR).is_dir() {
                sync::link_files(&ckpt.join(POLICY_DIR), &dir)?;
            } else {
                let d = dir.clone();
                on_learner(&mut learner, move |l| sync::export_as(l, format, &d)).await??;
            }
            Served { path: dir, step: served_step, owned: true }
        };
        let t0 = Instant::now();
        let (engine, pool): (Arc<dyn Engine>, _) = match cfg.engine.backend {
            Backend::Embedded => {
                let mut model = cfg.model.clone();
                model.path = served.path.clone();
                (Arc::new(MistralEngine::load(&model, &cfg.engine).await?), None)
            }
            Backend::Remote => {
                let pushed = served.owned.then(|| (served.step, served.path.clone()));
                let pool = Arc::new(RemoteEngine::connect(&cfg.engine.remote, &cfg.model.path, pushed).await?);
                (pool.clone(), Some(pool))
            }
        };
        eprintln!("engine ready in {:.1}s ({})", t0.elapsed().as_secs_f64(), served.path.display());

        let pool_before = pool.as_ref().map(|p| p.pool_stats()).unwrap_or_default();
        let metrics = MetricsWriter::open(&run.metrics(), Some(step))?;
        let checkpoints = Checkpoints::open(run.checkpoints())?;
        let mut trainer = Self {
            bars: Bars::new(cfg.run.steps, step),
            tasks: tasks.into_iter().map(Arc::new).collect(),
            cfg,
            run,
            hash,
            engine,
            pool,
            judge,
            learner,
            curriculum,
            sampler,
            checkpoints,
            metrics,
            served,
            pending: None,
            pool_before,
            step,
            dirty,
            last_saved: step,
            judge_spent: saved.as_ref().map(|s| s.judge_spent).unwrap_or_default(),
            stop: Arc::new(AtomicBool::new(false)),
            stop_notify: Arc::new(tokio::sync::Notify::new()),
        };
        if let (Some(ps), Some(d)) = (pending_step, &checkpoint) {
            if ps != step + 1 {
                anyhow::bail!("{}: pending step {ps} does not follow the checkpoint's step {step}", d.join(state::TRAINER_FILE).display());
            }
            trainer.pending = Some(Pending::read(d, ps, &trainer.tasks)?);
        }
        trainer.repair_after_resume(saved.and_then(|s| s.record))?;
        trainer.metrics.tensorboard(&trainer.run.root, trainer.cfg.run.tensorboard)?;
        // A resumed run shows the state it resumes in until its next step ends.
        let last = crate::metrics::read_jsonl_lenient(trainer.metrics.path()).ok().and_then(|m| m.last().cloned());
        if let Some(r) = last.and_then(|v| serde_json::from_value::<StepRecord>(v).ok()) {
            trainer.bars.steps.set_message(r.status());
        }
        install_signals(trainer.stop.clone(), trainer.stop_notify.clone());
        if let Some(d) = &checkpoint {
            trainer.bars.log(format!("resumed from {} (step {})", d.display(), trainer.step));
        }
        Ok(trainer)
    }

    /// After a crash: the checkpoint's own metrics line if the crash lost it, and no samples of
    /// steps that are about to run again.
    fn repair_after_resume(&mut self, record: Option<StepRecord>) -> Result<()> {
        // Resuming from an older checkpoint (`--resume PATH`, or newer ones that failed to
        // verify) starts a new history from it: the newer checkpoints are set aside.
        for (from, to) in self.checkpoints.abandon_after(self.step)? {
            self.bars.log(format!(
                "checkpoint {} is newer than the resume point (step {}): moved to {}",
                from.display(),
                self.step,
                to.display()
            ));
        }
        let have_last = crate::metrics::read_jsonl(self.metrics.path())?
            .last()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
            == Some(self.step);
        if self.step > 0 && !have_last {
            if let Some(mut r) = record {
                r.t_checkpoint = None;
                self.metrics.write(&r)?;
            }
        }
        let dir = self.run.samples();
        if dir.is_dir() {
            for e in std::fs::read_dir(&dir)? {
                let p = e?.path();
                let n = p.file_name().unwrap_or_default().to_string_lossy().to_string();
                let s = n.strip_prefix("step-").and_then(|r| r.strip_suffix(".jsonl")).and_then(|r| r.parse::<u64>().ok());
                if s.is_some_and(|s| s > self.step) {
                    std::fs::remove_file(&p)?;
                }
            }
        }
        Ok(())
    }
}
