//! The `[model]` section: which weights, in which format and dtype. A leaf: the engine, the
//! judge, the learner and `eval` all read it, and it reads nothing of theirs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The policy model: an HF directory (config.json, tokenizer.json, safetensors) or a GGUF file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub format: ModelFormat,
    #[serde(default)]
    pub dtype: DType,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelFormat {
    /// `.gguf` file -> gguf, otherwise an HF safetensors directory.
    #[default]
    Auto,
    Safetensors,
    Gguf,
}

/// Compute dtype. There is no `auto`: mistral.rs picks BF16 on CPU (slow) and, in a CUDA build,
/// shells out to nvidia-smi to decide, so we always say what we want.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DType {
    #[default]
    F32,
    Bf16,
    F16,
}

impl ModelConfig {
    /// The format after resolving `auto` from the path.
    pub fn resolved_format(&self) -> ModelFormat {
        match self.format {
            ModelFormat::Auto if self.path.extension().is_some_and(|e| e == "gguf") => ModelFormat::Gguf,
            ModelFormat::Auto => ModelFormat::Safetensors,
            f => f,
        }
    }
}
