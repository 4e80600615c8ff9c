//! safetensors in and out: memory-mapped reads one tensor at a time, atomic writes, and
//! name/shape-checked copies into variables.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

/// Copies `src` into the variable `dst`, converting dtype and device; shapes must match.
pub fn copy_checked(dst: &Tensor, src: &Tensor, name: &str) -> Result<()> {
    ensure!(
        dst.size() == src.size(),
        "tensor {name} has shape {:?}, expected {:?}",
        src.size(),
        dst.size()
    );
    let _g = tch::no_grad_guard();
    let mut d = dst.shallow_clone();
    d.f_copy_(src).with_context(|| format!("copying tensor {name}"))?;
    Ok(())
}

/// The safetensors files of a model directory: the shards listed in
/// `model.safetensors.index.json`, or `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no weight_map object", index.display()))?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        ensure!(!files.is_empty(), "{}: empty weight_map", index.display());
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    ensure!(single.is_file(), "{}: no model.safetensors or model.safetensors.index.json", dir.display());
    Ok(vec![single])
}

fn kind_of(d: safetensors::Dtype) -> Result<Kind> {
    use safetensors::Dtype as D;
    Ok(match d {
        D::F32 => Kind::Float,
        D::BF16 => Kind::BFloat16,
        D::F16 => Kind::Half,
        D::F64 => Kind::Double,
        D::I64 => Kind::Int64,
        other => bail!("unsupported dtype {other:?}"),
    })
}

/// Calls `f(name, tensor)` for each tensor of a safetensors file, one at a time from a memory
/// map, so loading never holds a second copy of the whole model.
pub fn for_each_tensor(path: &Path, mut f: impl FnMut(&str, Tensor) -> Result<()>) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the file is only read; a concurrent writer would be a bug elsewhere (we write atomically).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&mmap).with_context(|| format!("parsing {}", path.display()))?;
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name)?;
        let kind = kind_of(view.dtype()).with_context(|| format!("{}: tensor {name}", path.display()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&x| x as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        f(&name, t)?;
    }
    Ok(())
}

/// Reads a whole safetensors file into a name -> tensor map (small files: adapters, optimizer state).
pub fn read_all(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for_each_tensor(path, |n, t| {
        out.insert(n.to_string(), t);
        Ok(())
    })?;
    Ok(out)
}

/// A tensor to write: ready, or made when the writer reaches it (a LoRA merge), so an export
/// holds one tensor's merged and host copies at a time instead of the whole model's.
pub enum Source<'a> {
    Ready(Tensor),
    Lazy { shape: Vec<i64>, kind: Kind, make: Box<dyn Fn() -> Tensor + 'a> },
}

/// One tensor as the safetensors writer sees it. Its bytes are produced when the writer asks for
/// them, one tensor after another: borrowed straight from storage for a contiguous CPU tensor,
/// copied to the host otherwise (a GPU tensor, a lazy merge).
struct TchView<'a> {
    src: Source<'a>,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    len: usize,
}

impl<'a> TchView<'a> {
    fn new(name: &str, src: Source<'a>) -> Result<Self> {
        let (kind, size) = match &src {
            Source::Ready(t) => (t.kind(), t.size()),
            Source::Lazy { shape, kind, .. } => (*kind, shape.clone()),
        };
        let dtype = match kind {
            Kind::Float => safetensors::Dtype::F32,
            Kind::BFloat16 => safetensors::Dtype::BF16,
            Kind::Half => safetensors::Dtype::F16,
            Kind::Double => safetensors::Dtype::F64,
            Kind::Int64 => safetensors::Dtype::I64,
            k => bail!("tensor {name}: cannot save kind {k:?}"),
        };
        let shape: Vec<usize> = size.iter().map(|&x| x as usize).collect();
        let len = shape.iter().product::<usize>() * kind.elt_size_in_bytes();
        Ok(Self { src, dtype, shape, len })
    }
}

impl safetensors::View for &TchView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.len == 0 {
            return std::borrow::Cow::Borrowed(&[]);
        }
        if let Source::Ready(t) = &self.src {
            if t.device() == Device::Cpu && t.is_contiguous() {
                // SAFETY: `t` is a contiguous CPU tensor owned by `self`, so its storage holds
                // `len` initialised bytes at `data_ptr` for as long as the borrow of `self`.
                return std::borrow::Cow::Borrowed(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, self.len) });
            }
        }
        let _g = tch::no_grad_guard();
        let t = match &self.src {
            Source::Ready(t) => t.detach(),
            Source::Lazy { make, .. } => make(),
        };
        let t = t.to_device(Device::Cpu).contiguous();
        let mut bytes = vec![0u8; self.len];
        t.copy_data_u8(&mut bytes, t.numel());
        std::borrow::Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.len
    }
}

/// Writes named tensors as one safetensors file, atomically and durably (fsynced).
pub fn write_all(path: &Path, tensors: &[(String, Tensor)], metadata: Option<std::collections::HashMap<String, String>>) -> Result<()> {
    write_tensors(path, tensors, metadata, true)
}

fn write_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<std::collections::HashMap<String, String>>,
    durable: bool,
) -> Result<()> {
    let sources = tensors.iter().map(|(n, t)| (n.clone(), Source::Ready(t.shallow_clone()))).collect();
    write_sources(path, sources, metadata, durable)
}

/// Streams the tensors into a temporary sibling, one tensor's bytes at a time, then renames it
/// over `path` (fsynced when `durable`).
pub fn write_sources(
    path: &Path,
    sources: Vec<(String, Source<'_>)>,
    metadata: Option<std::collections::HashMap<String, String>>,
    durable: bool,
) -> Result<()> {
    let views: Vec<(String, TchView)> =
        sources.into_iter().map(|(n, s)| Ok((n.clone(), TchView::new(&n, s)?))).collect::<Result<_>>()?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| -> Result<()> {
        safetensors::serialize_to_file(views.iter().map(|(n, v)| (n.as_str(), v)), metadata, &tmp)?;
        if durable {
            std::fs::File::open(&tmp)?.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if durable {
            crate::fsutil::sync_dir(dir)?;
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", path.display()))
}
