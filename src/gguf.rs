//! `orchestrator import gguf`: a GGUF model (llama or qwen2) -> an HF model directory that both
//! the engine and the learner load.
//!
//! Tensors are dequantised (the quantisation error stays, the format goes), renamed to HF names,
//! and llama.cpp's RoPE row permutation of q/k is undone (llama only: its converter permutes,
//! the qwen2 one does not). config.json comes from the GGUF metadata, tokenizer.json is rebuilt
//! from `tokenizer.ggml.*` (byte-level BPE), and the chat template goes to tokenizer_config.json.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use tokenizers::models::bpe::BPE;
use tokenizers::models::ModelWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, Tokenizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutDType {
    F32,
    Bf16,
}

#[derive(Debug)]
pub struct ImportSummary {
    pub architecture: String,
    pub tensors: usize,
    pub parameters: usize,
    pub vocab_size: usize,
    pub tied_embeddings: bool,
}

struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.md
            .get(key)
            .with_context(|| format!("{}: GGUF metadata has no `{key}`", self.path.display()))
    }
    fn u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key)?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x as u64))
            .with_context(|| format!("{}: `{key}` is not an integer", self.path.display()))
    }
    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .with_context(|| format!("{}: `{key}` is not a number", self.path.display()))
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.get(key)?
            .to_vec()?
            .iter()
            .map(|v| Ok(v.to_string()?.clone()))
            .collect::<candle_core::Result<_>>()
            .with_context(|| format!("{}: `{key}` is not a list of strings", self.path.display()))
    }
    fn opt_string(&self, key: &str) -> Option<String> {
        self.md.get(key).and_then(|v| v.to_string().ok().cloned())
    }
}

/// llama.cpp's converter stores q/k rows interleaved per head for its RoPE kernel; this puts
/// them back in HF order: reshape(heads, rows/heads/2, 2, cols) -> swap(1, 2).
pub fn unpermute_rope_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    ensure!(rows % (heads * 2) == 0, "{rows} rows do not split into {heads} heads of pairs");
    Ok(w.reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The inverse of [`unpermute_rope_rows`], as GGUF converters apply it.
pub fn permute_rope_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

fn hf_name(gguf: &str) -> Option<String> {
    if let Some(rest) = gguf.strip_prefix("blk.") {
        let (layer, part) = rest.split_once('.')?;
        let mapped = match part {
            "attn_norm.weight" => "input_layernorm.weight",
            "ffn_norm.weight" => "post_attention_layernorm.weight",
            "attn_q.weight" => "self_attn.q_proj.weight",
            "attn_k.weight" => "self_attn.k_proj.weight",
            "attn_v.weight" => "self_attn.v_proj.weight",
            "attn_q.bias" => "self_attn.q_proj.bias",
            "attn_k.bias" => "self_attn.k_proj.bias",
            "attn_v.bias" => "self_attn.v_proj.bias",
            "attn_output.weight" => "self_attn.o_proj.weight",
            "ffn_gate.weight" => "mlp.gate_proj.weight",
            "ffn_up.weight" => "mlp.up_proj.weight",
            "ffn_down.weight" => "mlp.down_proj.weight",
            _ => return None,
        };
        return Some(format!("model.layers.{layer}.{mapped}"));
    }
    Some(
        match gguf {
            "token_embd.weight" => "model.embed_tokens.weight",
            "output_norm.weight" => "model.norm.weight",
            "output.weight" => "lm_head.weight",
            _ => return None,
        }
        .to_string(),
    )
}

/// Byte-level BPE from `tokenizer.ggml.*`; tokens of type 3 (control) become special tokens.
fn rebuild_tokenizer(meta: &Meta) -> Result<Tokenizer> {
    let model = meta.opt_string("tokenizer.ggml.model").unwrap_or_default();
    if model != "gpt2" {
        bail!(
            "{}: tokenizer.ggml.model is {model:?}; only byte-level BPE (\"gpt2\") is supported",
            meta.path.display()
        );
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .with_context(|| format!("{}: merge {m:?} is not a pair", meta.path.display()))
        })
        .collect::<Result<_>>()?;
    let vocab: ahash::AHashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("building BPE: {e}"))?;
    let mut tok = Tokenizer::new(ModelWrapper::BPE(bpe));
    let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    // SmolLM2's tokenizer splits digits one by one before the byte-level split.
    let pre = match meta.opt_string("tokenizer.ggml.pre").as_deref() {
        Some("smollm") => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level,
        ])),
        _ => byte_level,
    };
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(false, true, true))));
    if let Ok(types) = meta.get("tokenizer.ggml.token_type").and_then(|v| Ok(v.to_vec()?)) {
        let specials: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| t.to_i32().ok() == Some(3))
            .map(|(_, s)| AddedToken::from(s.clone(), true))
            .collect();
        tok.add_special_tokens(&specials);
    }
    Ok(tok)
}

fn write_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>, dtype: OutDType) -> Result<()> {
    let mut bytes: BTreeMap<&String, Vec<u8>> = BTreeMap::new();
    for (k, t) in tensors {
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let b = match dtype {
            OutDType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            OutDType::Bf16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        };
        bytes.insert(k, b);
    }
    let st = match dtype {
        OutDType::F32 => Dtype::F32,
        OutDType::Bf16 => Dtype::BF16,
    };
    let views = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), TensorView::new(st, t.dims().to_vec(), &bytes[k])?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path).with_context(|| format!("writing {}", path.display()))
}

/// Converts `gguf` into a new HF directory `out` (which must not exist): written into a
/// temporary sibling first and renamed, so a failure leaves nothing behind.
pub fn import_gguf(gguf: &Path, out: &Path, dtype: OutDType) -> Result<ImportSummary> {
    if out.exists() {
        bail!("{} already exists; choose a new output directory", out.display());
    }
    let mut file = std::fs::File::open(gguf).with_context(|| format!("opening {}", gguf.display()))?;
    let content = Content::read(&mut file).with_context(|| format!("{}: not a GGUF file", gguf.display()))?;
    let meta = Meta { md: &content.metadata, path: gguf };
    let arch = meta.opt_string("general.architecture").unwrap_or_default();
    let (hf_arch, model_type) = match arch.as_str() {
        "llama" => ("LlamaForCausalLM", "llama"),
        "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
        other => bail!("{}: architecture {other:?} is not supported (llama, qwen2)", gguf.display()),
    };
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = meta.u64(&key("embedding_length"))? as usize;
    let layers = meta.u64(&key("block_count"))? as usize;
    let heads = meta.u64(&key("attention.head_count"))? as usize;
    let kv_heads = meta.u64(&key("attention.head_count_kv")).unwrap_or(heads as u64) as usize;
    let tok = rebuild_tokenizer(&meta)?;
    let vocab = tok.get_vocab_size(true);

    let mut tensors = BTreeMap::new();
    let mut parameters = 0;
    for name in content.tensor_infos.keys() {
        let hf = hf_name(name).with_context(|| format!("{}: unexpected tensor {name}", gguf.display()))?;
        let q = content.tensor(&mut file, name, &Device::Cpu)?;
        let mut t = q.dequantize(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?;
        if arch == "llama" {
            if name.ends_with("attn_q.weight") {
                t = unpermute_rope_rows(&t, heads)?;
            } else if name.ends_with("attn_k.weight") {
                t = unpermute_rope_rows(&t, kv_heads)?;
            }
        }
        parameters += t.elem_count();
        tensors.insert(hf, t);
    }
    let tied = !tensors.contains_key("lm_head.weight");
    let embed_rows = tensors
        .get("model.embed_tokens.weight")
        .context("no token_embd.weight tensor")?
        .dims()[0];
    ensure!(embed_rows == vocab, "embedding has {embed_rows} rows but the tokenizer {vocab} tokens");

    let id_of = |k: &str| meta.u64(k).ok().map(|v| v as u32);
    let name_of = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    let (bos, eos) = (id_of("tokenizer.ggml.bos_token_id"), id_of("tokenizer.ggml.eos_token_id"));
    let pad = id_of("tokenizer.ggml.padding_token_id");
    let mut config = json!({
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": meta.u64(&key("feed_forward_length"))?,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": meta.u64(&key("context_length"))?,
        "rms_norm_eps": meta.f64(&key("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": meta.f64(&key("rope.freq_base")).unwrap_or(10000.0),
        "tie_word_embeddings": tied,
        "vocab_size": vocab,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": match dtype { OutDType::F32 => "float32", OutDType::Bf16 => "bfloat16" },
    });
    if arch == "qwen2" {
        config["use_sliding_window"] = json!(false);
        config["sliding_window"] = json!(null);
        config["max_window_layers"] = json!(layers);
    }
    let tokenizer_config = json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "bos_token": name_of(bos),
        "eos_token": name_of(eos),
        "pad_token": name_of(pad),
        "chat_template": meta.opt_string("tokenizer.chat_template"),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": false,
    });

    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp: PathBuf = parent.join(format!(
        ".{}.importing-{}",
        out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let written = (|| -> Result<()> {
        std::fs::write(tmp.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
        std::fs::write(tmp.join("tokenizer_config.json"), serde_json::to_vec_pretty(&tokenizer_config)?)?;
        std::fs::write(
            tmp.join("generation_config.json"),
            serde_json::to_vec_pretty(&json!({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}))?,
        )?;
        tok.save(tmp.join("tokenizer.json"), false)
            .map_err(|e| anyhow::anyhow!("saving tokenizer: {e}"))?;
        write_tensors(&tmp.join("model.safetensors"), &tensors, dtype)?;
        std::fs::rename(&tmp, out)?;
        crate::fsutil::sync_dir(parent)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing {}", out.display())));
    }
    Ok(ImportSummary {
        architecture: arch,
        tensors: tensors.len(),
        parameters,
        vocab_size: vocab,
        tied_embeddings: tied,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_permutation_round_trips() {
        let w = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu).unwrap().reshape((8, 3)).unwrap();
        let p = permute_rope_rows(&w, 2).unwrap();
        assert_ne!(p.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        // Head 0 rows [0,1,2,3] are stored as [0,2,1,3].
        assert_eq!(p.to_vec2::<f32>().unwrap()[1], w.to_vec2::<f32>().unwrap()[2]);
        let back = unpermute_rope_rows(&p, 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn names_map_to_hf() {
        assert_eq!(hf_name("blk.3.attn_k.weight").unwrap(), "model.layers.3.self_attn.k_proj.weight");
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_name("blk.0.something").is_none());
    }
}
