//! The byte-level BPE of a synthetic model: exactly the model's vocabulary, every id decodable.

use anyhow::{bail, ensure, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::models::ModelWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, Tokenizer};

use super::special_ids;
use crate::chatml::{BOS, EOS, PAD};

/// GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits).
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = ('!' as u32..='~' as u32).chain(0xa1..=0xac).chain(0xae..=0xff).collect();
    printable.sort_unstable();
    let mut n = 0;
    (0u32..256)
        .map(|b| {
            if printable.binary_search(&b).is_ok() {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            }
        })
        .collect()
}

/// A byte-level BPE with exactly `vocab` ids: the 256 bytes (ids 0-255, in byte order), merge
/// tokens (every byte pair, then a pair token plus a byte, ...) up to `vocab - 3`, and the three
/// ChatML specials as the last ids. Any id decodes (to bytes, shown lossily if not UTF-8).
pub fn covering_tokenizer(vocab: usize) -> Result<Tokenizer> {
    ensure!(vocab >= 259 + 16, "vocabulary of {vocab} is too small for a byte-level tokenizer (>= 275)");
    let bytes = byte_chars();
    let n_merges = vocab - 3 - 256;
    let mut tokens: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    let mut merges: Vec<(String, String)> = Vec::with_capacity(n_merges);
    // Level 2: every (a, b) byte pair, in byte order; level k + 1: every level-k token + a byte.
    let mut prev_level: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    'outer: loop {
        let mut next = Vec::new();
        for left in &prev_level {
            for b in &bytes {
                if merges.len() == n_merges {
                    break 'outer;
                }
                let t = format!("{left}{b}");
                merges.push((left.clone(), b.to_string()));
                tokens.push(t.clone());
                next.push(t);
            }
        }
        prev_level = next;
    }
    let vocab_map: ahash::AHashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    ensure!(vocab_map.len() == tokens.len(), "duplicate generated tokens");
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("building the BPE model: {e}"))?;
    let mut tok = Tokenizer::new(ModelWrapper::BPE(bpe));
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(false, true, true))));
    let specials: Vec<AddedToken> = [PAD, BOS, EOS].iter().map(|s| AddedToken::from(s.to_string(), true)).collect();
    tok.add_special_tokens(&specials);
    let got = tok.get_vocab_size(true);
    if got != vocab {
        bail!("covering tokenizer has {got} ids, wanted {vocab}");
    }
    let (pad, bos, eos) = special_ids(vocab);
    for (s, id) in [(PAD, pad), (BOS, bos), (EOS, eos)] {
        ensure!(tok.token_to_id(s) == Some(id as u32), "{s} is not id {id}");
    }
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_covers_every_id_and_round_trips_text() {
        let tok = covering_tokenizer(70_000).unwrap();
        assert_eq!(tok.get_vocab_size(true), 70_000);
        for id in [0u32, 255, 256, 65_791, 65_792, 69_996, 69_997, 69_999] {
            let s = tok.decode(&[id], false).unwrap();
            assert!(!s.is_empty(), "id {id} decodes to nothing");
        }
        let text = "Write a story, about the sea: 42 waves! ünïcode";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        assert!(enc.get_ids().len() < text.len(), "merges apply");
    }
}
