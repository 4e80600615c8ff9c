//! The `[engine.remote]` config section: a pool of vLLM or SGLang servers generating rollouts.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::validate::Problems;

/// Names of pushed versions start with this (a base model name must not).
pub const VERSION_PREFIX: &str = "policy-v";

/// Which server software the pool runs; it picks the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RemoteKind {
    /// `POST /v1/completions` with prompt ids; LoRA through `/v1/load_lora_adapter`.
    #[default]
    Vllm,
    /// `POST /generate` with `input_ids`; LoRA through `/load_lora_adapter`, full weights through
    /// `/update_weights_from_disk`.
    Sglang,
}

/// What a sync sends to the servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightPush {
    /// The LoRA adapter in PEFT layout, loaded under a new name per version.
    #[default]
    Lora,
    /// A full HF directory the servers reload from (SGLang only).
    Disk,
    /// Nothing: the servers keep the weights they were started with (rollouts go stale).
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    pub kind: RemoteKind,
    /// Base URLs, e.g. `http://10.0.0.5:8000` (no `/v1`).
    pub servers: Vec<String>,
    /// The name the servers serve the base model under (`--served-model-name`); pushed LoRA
    /// versions get names of their own (`policy-v000012`).
    pub model: String,
    /// The NAME of the environment variable holding the servers' API key; empty = no key. The
    /// key itself is never written anywhere.
    pub api_key_env: String,
    /// Generation requests one server has in flight at most (one per sample). Prompt groups are
    /// handed out only while a server has room, so a slow server gets fewer of them.
    pub max_in_flight_per_server: usize,
    pub connect_timeout_secs: f64,
    /// One generation request (one sample), start to end.
    pub request_timeout_secs: f64,
    /// One weight push (adapter load or unload, full-weight update) on one server, start to
    /// end; a server that takes longer is ejected (and a readmission gives up), so a stuck
    /// server never holds up the pushes to the others.
    pub push_timeout_secs: f64,
    /// The servers' `--max-loras` (vLLM), for `check` to compare with the LoRA versions a run
    /// keeps loaded at once; 0 = not stated.
    pub max_loras: usize,
    /// The base model's directory as the servers see it (`weight_push = "disk"`: a run starting
    /// from step 0 first resets every server to it); empty = `model.path`.
    pub base_path: PathBuf,
    pub weight_push: WeightPush,
    /// Where pushed weights are written: a path every server can read (shared storage) under the
    /// same name. One run per directory.
    pub export_dir: PathBuf,
    /// Times a prompt group is sent again after the server it ran on failed.
    pub max_group_retries: usize,
    /// Share of a step's prompt groups that must arrive for the step to go on; below it the run
    /// stops with an error (after its last checkpoint).
    pub min_groups_share: f64,
    /// How often an ejected server's `/health` is asked.
    pub probe_interval_secs: f64,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            kind: RemoteKind::Vllm,
            servers: Vec::new(),
            model: String::new(),
            api_key_env: String::new(),
            max_in_flight_per_server: 64,
            connect_timeout_secs: 10.0,
            request_timeout_secs: 1800.0,
            push_timeout_secs: 600.0,
            max_loras: 0,
            base_path: PathBuf::new(),
            weight_push: WeightPush::Lora,
            export_dir: PathBuf::new(),
            max_group_retries: 3,
            min_groups_share: 1.0,
            probe_interval_secs: 5.0,
        }
    }
}

impl RemoteConfig {
    /// Checks of this section alone; `lora_enabled` is `learner.lora.enabled`.
    pub fn validate(&self, key: &str, lora_enabled: bool, p: &mut Problems) {
        if self.servers.is_empty() {
            p.push(&format!("{key}.servers"), "backend = \"remote\" needs at least one server URL");
        }
        for (i, s) in self.servers.iter().enumerate() {
            match reqwest::Url::parse(s) {
                // Credentials in a URL end up in every log line and error that names the server.
                Ok(u) if !u.username().is_empty() || u.password().is_some() => p.push(
                    &format!("{key}.servers[{i}]"),
                    "must not carry credentials (user:password@); put the key in an environment variable and name it in api_key_env",
                ),
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => p.push(&format!("{key}.servers[{i}]"), format!("must be an http(s) base URL like \"http://host:8000\", got {s:?}")),
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.servers {
            if !seen.insert(s.trim_end_matches('/')) {
                p.push(&format!("{key}.servers"), format!("{s:?} is listed twice"));
            }
        }
        if self.model.trim().is_empty() {
            p.push(&format!("{key}.model"), "must name the model the servers serve (their --served-model-name)");
        }
        if self.model.starts_with(VERSION_PREFIX) {
            p.push(&format!("{key}.model"), format!("must not start with {:?} (the names of pushed versions)", VERSION_PREFIX));
        }
        if !self.api_key_env.is_empty() && !self.api_key_env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            p.push(&format!("{key}.api_key_env"), "must be the NAME of an environment variable (letters, digits, _), not the key");
        }
        if self.max_in_flight_per_server == 0 {
            p.push(&format!("{key}.max_in_flight_per_server"), "must be >= 1, got 0");
        }
        p.seconds(&format!("{key}.connect_timeout_secs"), self.connect_timeout_secs, 0.001);
        p.seconds(&format!("{key}.request_timeout_secs"), self.request_timeout_secs, 0.001);
        p.seconds(&format!("{key}.push_timeout_secs"), self.push_timeout_secs, 0.001);
        p.seconds(&format!("{key}.probe_interval_secs"), self.probe_interval_secs, 0.01);
        p.open_closed(&format!("{key}.min_groups_share"), self.min_groups_share, 0.0, 1.0);
        match self.weight_push {
            WeightPush::Disk if self.kind == RemoteKind::Vllm => p.push(
                &format!("{key}.weight_push"),
                "\"disk\" with kind = \"vllm\": stock vLLM has no full-weight endpoint; use \"lora\" (learner.lora.enabled = true) or kind = \"sglang\"",
            ),
            WeightPush::Lora if !lora_enabled => p.push(
                &format!("{key}.weight_push"),
                "\"lora\" needs learner.lora.enabled = true (or weight_push = \"disk\" with kind = \"sglang\")",
            ),
            _ => {}
        }
        if self.weight_push != WeightPush::None && self.export_dir.as_os_str().is_empty() {
            p.push(&format!("{key}.export_dir"), "must be set: a directory every server can read, where pushed weights are written");
        }
    }
}

impl RemoteConfig {
    /// LoRA versions a vLLM server holds at once: the one generating, the one being loaded
    /// and, one step off, the previous one still finishing the rollouts it started.
    pub fn lora_versions_in_flight(one_step_off: bool) -> usize {
        if one_step_off {
            3
        } else {
            2
        }
    }

    /// `check`'s warning when the servers' `--max-loras` (as stated in `max_loras`) cannot hold
    /// the versions a run keeps loaded.
    pub fn max_loras_warning(&self, key: &str, one_step_off: bool) -> Option<String> {
        if self.kind != RemoteKind::Vllm || self.weight_push != WeightPush::Lora {
            return None;
        }
        let need = Self::lora_versions_in_flight(one_step_off);
        let why = if one_step_off { "one-step-off keeps the current, the previous and the loading version" } else { "a push loads the new version while the current one still generates" };
        match self.max_loras {
            0 => Some(format!(
                "{key}.max_loras is not set: start vLLM with --max-loras >= {need} ({why}) and state it here so check can verify it"
            )),
            n if n < need => Some(format!(
                "{key}.max_loras = {n}: vLLM evicts and reloads adapters with fewer than {need} slots ({why}); start it with --max-loras >= {need}"
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(c: &RemoteConfig, lora: bool) -> Vec<String> {
        let mut p = Problems::default();
        c.validate("engine.remote", lora, &mut p);
        p.0
    }

    fn good() -> RemoteConfig {
        RemoteConfig {
            servers: vec!["http://127.0.0.1:8000".into(), "http://127.0.0.1:8001/".into()],
            model: "base".into(),
            export_dir: "/shared/x".into(),
            ..RemoteConfig::default()
        }
    }

    #[test]
    fn a_good_config_passes() {
        assert!(problems(&good(), true).is_empty(), "{:?}", problems(&good(), true));
        let c = RemoteConfig { kind: RemoteKind::Sglang, weight_push: WeightPush::Disk, ..good() };
        assert!(problems(&c, false).is_empty());
        let c = RemoteConfig { weight_push: WeightPush::None, export_dir: PathBuf::new(), ..good() };
        assert!(problems(&c, false).is_empty());
    }

    #[test]
    fn each_bad_key_is_named() {
        let cases: Vec<(RemoteConfig, bool, &str, &str)> = vec![
            (RemoteConfig { servers: vec![], ..good() }, true, "engine.remote.servers:", "at least one"),
            (RemoteConfig { servers: vec!["localhost:8000".into()], ..good() }, true, "engine.remote.servers[0]:", "http(s) base URL"),
            (RemoteConfig { servers: vec!["http://user:secret@127.0.0.1:8000".into()], ..good() }, true, "engine.remote.servers[0]:", "credentials"),
            (RemoteConfig { servers: vec!["http://token@127.0.0.1:8000".into()], ..good() }, true, "engine.remote.servers[0]:", "credentials"),
            (RemoteConfig { push_timeout_secs: -1.0, ..good() }, true, "engine.remote.push_timeout_secs:", "duration"),
            (RemoteConfig { servers: vec!["http://a:1".into(), "http://a:1/".into()], ..good() }, true, "engine.remote.servers:", "listed twice"),
            (RemoteConfig { model: " ".into(), ..good() }, true, "engine.remote.model:", "--served-model-name"),
            (RemoteConfig { model: "policy-v000001".into(), ..good() }, true, "engine.remote.model:", "pushed versions"),
            (RemoteConfig { api_key_env: "sk-abc def".into(), ..good() }, true, "engine.remote.api_key_env:", "NAME"),
            (RemoteConfig { max_in_flight_per_server: 0, ..good() }, true, "engine.remote.max_in_flight_per_server:", ">= 1"),
            (RemoteConfig { connect_timeout_secs: 0.0, ..good() }, true, "engine.remote.connect_timeout_secs:", "duration"),
            (RemoteConfig { request_timeout_secs: f64::INFINITY, ..good() }, true, "engine.remote.request_timeout_secs:", "finite"),
            (RemoteConfig { min_groups_share: 0.0, ..good() }, true, "engine.remote.min_groups_share:", "(0, 1]"),
            (RemoteConfig { min_groups_share: 1.5, ..good() }, true, "engine.remote.min_groups_share:", "(0, 1]"),
            (RemoteConfig { weight_push: WeightPush::Disk, ..good() }, true, "engine.remote.weight_push:", "stock vLLM has no full-weight endpoint"),
            (good(), false, "engine.remote.weight_push:", "learner.lora.enabled"),
            (RemoteConfig { export_dir: PathBuf::new(), ..good() }, true, "engine.remote.export_dir:", "must be set"),
        ];
        for (c, lora, key, msg) in cases {
            let p = problems(&c, lora);
            assert_eq!(p.len(), 1, "{c:?}: {p:?}");
            assert!(p[0].starts_with(key) && p[0].contains(msg), "{p:?} lacks {key} {msg}");
            assert!(!p[0].contains("secret"), "a problem repeats the password: {p:?}");
        }
    }

    #[test]
    fn max_loras_must_cover_the_versions_in_flight() {
        let c = |n| RemoteConfig { max_loras: n, ..good() };
        assert!(c(0).max_loras_warning("engine.remote", false).unwrap().contains("--max-loras >= 2"));
        assert!(c(2).max_loras_warning("engine.remote", false).is_none());
        assert!(c(2).max_loras_warning("engine.remote", true).unwrap().contains("max_loras = 2"));
        assert!(c(3).max_loras_warning("engine.remote", true).is_none());
        let sglang = RemoteConfig { kind: RemoteKind::Sglang, ..c(0) };
        assert!(sglang.max_loras_warning("engine.remote", true).is_none());
    }
}
