//! Embeds the eBPF object built by `cargo xtask build` (or the file named by
//! HAVIP_EBPF_OBJECT). Without it the crate still compiles, with an empty object that makes
//! havipd say how to build it, so `cargo check` works without the nightly toolchain.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let target_dir = env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| manifest.join("../target"));
    let object = env::var("HAVIP_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| target_dir.join("bpfel-unknown-none/release/havip"));
    println!("cargo:rerun-if-env-changed=HAVIP_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("havip.bpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!("cargo:warning=eBPF object {} not found; run `cargo xtask build`", object.display());
            fs::write(&out, []).unwrap();
        }
    }
}
