//! Small random HF model directories (Llama and Qwen2 layouts) for tests and benchmarks:
//! config.json, model.safetensors, a byte-level BPE tokenizer.json trained with the
//! `tokenizers` crate, tokenizer_config.json with a ChatML template, generation_config.json.
//! Everything is a deterministic function of the spec; nothing touches the network.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, Tokenizer};

pub use crate::chatml::{BOS, CHAT_TEMPLATE, EOS, PAD};

const CORPUS: &[&str] = &[
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "The essay argues that cities should plant more trees along every street.",
    "Dear hiring manager, I am writing to apply for the position of editor.",
    "Once upon a time, in a quiet village by the sea, there lived an old sailor.",
    "Summarise the main points of the report in three clear paragraphs.",
    "The committee will meet on Thursday to review the proposal and the budget.",
    "She opened the letter slowly, afraid of what the words inside might say.",
    "A good review explains what works, what does not, and why it matters.",
    "Describe the morning market: the smells, the colours, the voices of the traders.",
    "In conclusion, the evidence shows that regular reading improves writing.",
    "He walked along the river and thought about the years that had passed.",
    "Please write a formal email to the team announcing the new schedule.",
    "The answer is clear, concise, and written for a general audience.",
    "Poetry asks the reader to slow down and listen to every single word.",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

#[derive(Debug, Clone)]
pub struct TinySpec {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub seed: u64,
}

impl TinySpec {
    /// Tied embeddings, no attention bias (SmolLM2-like).
    pub fn llama(seed: u64) -> Self {
        Self {
            arch: Arch::Llama,
            vocab_size: 362,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            tie_word_embeddings: true,
            max_position_embeddings: 2048,
            rope_theta: 10000.0,
            seed,
        }
    }

    /// Untied embeddings, q/k/v bias.
    pub fn qwen2(seed: u64) -> Self {
        Self {
            arch: Arch::Qwen2,
            tie_word_embeddings: false,
            rope_theta: 1_000_000.0,
            ..Self::llama(seed)
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Writes the whole model directory into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let tok = train_tokenizer(self.vocab_size)?;
        tok.save(dir.join("tokenizer.json"), false)
            .map_err(|e| anyhow::anyhow!("saving tokenizer: {e}"))?;
        let id = |t: &str| tok.token_to_id(t).context("special token missing");
        let (bos, eos, pad) = (id(BOS)?, id(EOS)?, id(PAD)?);
        let vocab = tok.get_vocab_size(true);
        anyhow::ensure!(vocab == self.vocab_size, "tokenizer has {vocab} tokens, spec {}", self.vocab_size);

        let arch = match self.arch {
            Arch::Llama => ("LlamaForCausalLM", "llama"),
            Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        };
        let mut config = json!({
            "architectures": [arch.0],
            "model_type": arch.1,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vocab_size": self.vocab_size,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        });
        match self.arch {
            Arch::Llama => {
                config["attention_bias"] = json!(false);
                config["rope_scaling"] = json!(null);
            }
            Arch::Qwen2 => {
                config["use_sliding_window"] = json!(false);
                config["sliding_window"] = json!(null);
                config["max_window_layers"] = json!(self.num_hidden_layers);
            }
        }
        write_json(&dir.join("config.json"), &config)?;
        crate::chatml::write_configs(dir, pad as usize, bos as usize, eos as usize, self.max_position_embeddings)?;
        write_safetensors(&dir.join("model.safetensors"), &self.weights())
    }

    /// HF-named f32 tensors: (name, shape, values).
    pub fn weights(&self) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = self.num_key_value_heads * self.head_dim();
        let mut w = BTreeMap::new();
        // Uniform with the variance of N(0, scale^2 / fan_in): logits of order one, so the
        // distributions are neither flat nor one-hot.
        let mut mat = |name: String, rows: usize, cols: usize, scale: f32, rng: &mut ChaCha8Rng| {
            let a = scale * (3.0 / cols as f32).sqrt();
            let vals = (0..rows * cols).map(|_| rng.random_range(-a..a)).collect();
            w.insert(name, (vec![rows, cols], vals));
        };
        // Tied or not, logits come out with a standard deviation of about 2.
        mat("model.embed_tokens.weight".into(), v, h, 2.0, &mut rng);
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            mat(format!("{p}.self_attn.q_proj.weight"), h, h, 1.0, &mut rng);
            mat(format!("{p}.self_attn.k_proj.weight"), kv, h, 1.0, &mut rng);
            mat(format!("{p}.self_attn.v_proj.weight"), kv, h, 1.0, &mut rng);
            mat(format!("{p}.self_attn.o_proj.weight"), h, h, 1.0, &mut rng);
            mat(format!("{p}.mlp.gate_proj.weight"), i, h, 1.0, &mut rng);
            mat(format!("{p}.mlp.up_proj.weight"), i, h, 1.0, &mut rng);
            mat(format!("{p}.mlp.down_proj.weight"), h, i, 1.0, &mut rng);
        }
        if !self.tie_word_embeddings {
            mat("lm_head.weight".into(), v, h, 2.0, &mut rng);
        }
        let mut vec1 = |name: String, n: usize, center: f32, spread: f32, rng: &mut ChaCha8Rng| {
            let vals = (0..n).map(|_| center + rng.random_range(-spread..spread)).collect();
            w.insert(name, (vec![n], vals));
        };
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            vec1(format!("{p}.input_layernorm.weight"), h, 1.0, 0.1, &mut rng);
            vec1(format!("{p}.post_attention_layernorm.weight"), h, 1.0, 0.1, &mut rng);
            if self.arch == Arch::Qwen2 {
                vec1(format!("{p}.self_attn.q_proj.bias"), h, 0.0, 0.2, &mut rng);
                vec1(format!("{p}.self_attn.k_proj.bias"), kv, 0.0, 0.2, &mut rng);
                vec1(format!("{p}.self_attn.v_proj.bias"), kv, 0.0, 0.2, &mut rng);
            }
        }
        vec1("model.norm.weight".into(), h, 1.0, 0.1, &mut rng);
        w
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(v)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes f32 tensors as one safetensors file.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Result<()> {
    let bytes: BTreeMap<&String, Vec<u8>> = tensors
        .iter()
        .map(|(k, (_, vals))| (k, vals.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = tensors
        .iter()
        .map(|(k, (shape, _))| Ok((k.clone(), TensorView::new(Dtype::F32, shape.clone(), &bytes[k])?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing {}", path.display()))
}

/// A byte-level BPE trained on a fixed corpus: the 256 byte symbols, the three ChatML
/// specials, and merges up to `vocab_size`.
pub fn train_tokenizer(vocab_size: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::new(ModelWrapper::BPE(BPE::default()));
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(false, true, true))));
    let specials = [PAD, BOS, EOS]
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect::<Vec<_>>();
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(1)
            .show_progress(false)
            .special_tokens(specials.clone())
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    let corpus: Vec<String> = CORPUS.iter().map(|s| s.to_string()).collect();
    tok.train(&mut trainer, corpus.into_iter())
        .map_err(|e| anyhow::anyhow!("training tokenizer: {e}"))?;
    tok.add_special_tokens(&specials);
    Ok(tok)
}
