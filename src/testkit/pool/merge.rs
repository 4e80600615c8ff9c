//! A PEFT LoRA adapter directory (as `Learner::export_adapter` and `peft` write it) merged into
//! an HF model's weights: W + s B A in f32, s = lora_alpha / r (lora_alpha / sqrt r with rsLoRA).
//! What the pool test servers serve a pushed adapter with; every input is checked, so a corrupt
//! or mismatched adapter is an error naming the file and tensor, never a panic or a silent skip.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::Value;

/// The parts of `adapter_config.json` a merge needs.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub r: usize,
    pub alpha: f64,
    pub rslora: bool,
}

impl AdapterConfig {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let v: Value = serde_json::from_slice(&bytes).with_context(|| format!("{}: not JSON", path.display()))?;
        let at = |what: &str| format!("{}: {what}", path.display());
        if let Some(t) = v.get("peft_type").filter(|t| !t.is_null()) {
            ensure!(t.as_str() == Some("LORA"), at(&format!("peft_type {t} is not \"LORA\"")));
        }
        let r = v.get("r").and_then(Value::as_u64).filter(|&r| r >= 1).with_context(|| at("r must be an integer >= 1"))?;
        let alpha = v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .filter(|a| a.is_finite() && *a > 0.0)
            .with_context(|| at("lora_alpha must be a number > 0"))?;
        let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        ensure!(!flag("use_dora"), at("DoRA adapters are not supported"));
        ensure!(!flag("fan_in_fan_out"), at("fan_in_fan_out adapters are not supported"));
        if let Some(b) = v.get("bias").and_then(Value::as_str) {
            ensure!(b == "none", at(&format!("bias = {b:?} is not supported (\"none\" only)")));
        }
        Ok(Self { r: r as usize, alpha, rslora: flag("use_rslora") })
    }
}

/// One tensor of a safetensors file: dtype, shape, little-endian bytes.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn to_f32(t: &Raw, name: &str) -> Result<Vec<f32>> {
    let n: usize = t.shape.iter().product();
    let vals: Vec<f32> = match t.dtype {
        Dtype::F32 => t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => t.data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => t.data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        d => bail!("{name}: dtype {d:?} is not supported (f32, bf16, f16)"),
    };
    ensure!(vals.len() == n, "{name}: {} values for shape {:?}", vals.len(), t.shape);
    if let Some(i) = vals.iter().position(|x| !x.is_finite()) {
        bail!("{name}: non-finite value {} at index {i}", vals[i]);
    }
    Ok(vals)
}

fn from_f32(vals: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => vals.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        Dtype::F16 => vals.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        _ => vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn read_safetensors(path: &Path, out: &mut BTreeMap<String, Raw>) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    for (name, view) in st.tensors() {
        let raw = Raw { dtype: view.dtype(), shape: view.shape().to_vec(), data: view.data().to_vec() };
        ensure!(out.insert(name.clone(), raw).is_none(), "{}: tensor {name} appears twice", path.display());
    }
    Ok(())
}

/// The weight files of an HF model directory (every `*.safetensors`, sorted).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_file() && p.extension().is_some_and(|x| x == "safetensors") {
            files.push(p);
        }
    }
    files.sort();
    ensure!(!files.is_empty(), "{}: no *.safetensors weights", dir.display());
    Ok(files)
}

/// Writes into `out` (created) an HF model directory: `base`'s config and tokenizer files and
/// one `model.safetensors` with the adapter of `adapter` merged into `base`'s weights (in their
/// dtype; the sum is computed in f32). Returns how many weights the adapter changed.
pub fn merge_adapter(base: &Path, adapter: &Path, out: &Path) -> Result<usize> {
    ensure!(adapter.is_dir(), "adapter directory {} does not exist", adapter.display());
    let cfg = AdapterConfig::read(&adapter.join("adapter_config.json"))?;
    let ad_path = adapter.join("adapter_model.safetensors");
    let mut ad = BTreeMap::new();
    read_safetensors(&ad_path, &mut ad)?;
    // PEFT's names: the HF module name under `base_model.model.`, then lora_A/lora_B.
    let prefix = crate::learner::lora::peft_name("");
    let mut pairs: BTreeMap<String, (Option<Raw>, Option<Raw>)> = BTreeMap::new();
    for (name, t) in ad {
        let module = name.strip_prefix(&prefix);
        let (module, is_a) = match module {
            Some(m) if m.ends_with(".lora_A.weight") => (m.trim_end_matches(".lora_A.weight"), true),
            Some(m) if m.ends_with(".lora_B.weight") => (m.trim_end_matches(".lora_B.weight"), false),
            _ => bail!("{}: unexpected tensor {name} (PEFT LoRA names {prefix}<module>.lora_A.weight / .lora_B.weight expected)", ad_path.display()),
        };
        let slot = pairs.entry(module.to_string()).or_default();
        if is_a { slot.0 = Some(t) } else { slot.1 = Some(t) }
    }
    ensure!(!pairs.is_empty(), "{}: no LoRA tensors", ad_path.display());

    let mut weights = BTreeMap::new();
    for f in weight_files(base)? {
        read_safetensors(&f, &mut weights)?;
    }
    let scale = cfg.scale() as f32;
    for (module, (a, b)) in &pairs {
        let at = |what: &str| format!("{}: {module}: {what}", ad_path.display());
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (None, _) => bail!(at("lora_B without lora_A")),
            (_, None) => bail!(at("lora_A without lora_B")),
        };
        let wname = format!("{module}.weight");
        let w = weights.get_mut(&wname).with_context(|| at(&format!("the base model has no weight {wname}")))?;
        ensure!(w.shape.len() == 2, at(&format!("base weight has shape {:?}, a matrix expected", w.shape)));
        let (rows, cols, r) = (w.shape[0], w.shape[1], cfg.r);
        ensure!(a.shape == [r, cols], at(&format!("lora_A has shape {:?}, expected [{r}, {cols}] (r = {r})", a.shape)));
        ensure!(b.shape == [rows, r], at(&format!("lora_B has shape {:?}, expected [{rows}, {r}] (r = {r})", b.shape)));
        let av = to_f32(a, &format!("{module}.lora_A.weight"))?;
        let bv = to_f32(b, &format!("{module}.lora_B.weight"))?;
        let mut wv = to_f32(w, &wname)?;
        // W + (B A) s, row by row: delta[o, i] = sum_k B[o, k] A[k, i].
        let mut delta = vec![0f32; cols];
        for o in 0..rows {
            delta.iter_mut().for_each(|d| *d = 0.0);
            for k in 0..r {
                let bk = bv[o * r + k];
                for (d, x) in delta.iter_mut().zip(&av[k * cols..(k + 1) * cols]) {
                    *d += bk * x;
                }
            }
            for (x, d) in wv[o * cols..(o + 1) * cols].iter_mut().zip(&delta) {
                *x += d * scale;
            }
        }
        w.data = from_f32(&wv, w.dtype);
    }

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for e in std::fs::read_dir(base).with_context(|| format!("reading {}", base.display()))? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        // Shard indexes name the base's files; the merged weights are one file.
        let keep = (name.ends_with(".json") && !name.ends_with(".index.json")) || name.ends_with(".jinja") || name.ends_with(".txt");
        if p.is_file() && keep {
            std::fs::copy(&p, out.join(&name)).with_context(|| format!("copying {} into {}", p.display(), out.display()))?;
        }
    }
    let views = weights
        .iter()
        .map(|(k, t)| Ok((k.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data)?)))
        .collect::<Result<Vec<_>>>()?;
    let dst = out.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &dst).with_context(|| format!("writing {}", dst.display()))?;
    Ok(pairs.len())
}
