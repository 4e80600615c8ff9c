//! Bakes libtorch's directory into the binary's rpath so it runs without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // The CUDA runtime wheels land beside torch in site-packages/nvidia/cu13/lib.
        let cu13 = std::path::Path::new(&lib).join("../../nvidia/cu13/lib");
        if cu13.is_dir() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cu13.display());
        }
    }
    // `--as-needed` drops libtorch_cuda (nothing references it by symbol) and tch then never
    // sees a GPU; keep libtorch itself when asked.
    if std::env::var_os("CARGO_FEATURE_TORCH_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
