//! ChatML, the chat format the models this project writes use (tiny test models and real-shape
//! synthetic ones): its special tokens, the Jinja chat template, and the generation and tokenizer
//! configs that carry them.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

pub const BOS: &str = "<|im_start|>";
pub const EOS: &str = "<|im_end|>";
pub const PAD: &str = "<|endoftext|>";

pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Writes `generation_config.json` and `tokenizer_config.json` (with the chat template) for a
/// ChatML model whose special tokens have these ids.
pub fn write_configs(dir: &Path, pad: usize, bos: usize, eos: usize, model_max_length: usize) -> Result<()> {
    let write = |name: &str, v: serde_json::Value| {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(&v)?).with_context(|| format!("writing {}", path.display()))
    };
    write("generation_config.json", json!({ "bos_token_id": bos, "eos_token_id": [eos, pad], "pad_token_id": pad }))?;
    write(
        "tokenizer_config.json",
        json!({
            "add_bos_token": false,
            "add_eos_token": false,
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": null,
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": model_max_length,
            "tokenizer_class": "GPT2Tokenizer",
            "clean_up_tokenization_spaces": false,
        }),
    )
}
