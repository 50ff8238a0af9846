//! Compiles the uplink's XDP program (bpf/vxlan_redirect.c) with clang
//! into an eBPF object that `xdp.rs` embeds and loads.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/vxlan_redirect.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("vxlan_redirect.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // Debian keeps <asm/types.h> under the multiarch directory, which
    // clang does not search for the bpf target.
    let multiarch = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf", "-c", src, "-o"])
        .arg(&out)
        .arg(format!("-I{multiarch}"))
        .status()
        .unwrap_or_else(|e| {
            panic!("running {clang} to build the XDP program failed: {e} (install clang, llvm and libbpf-dev; scripts/test does)")
        });
    assert!(
        status.success(),
        "{clang} could not compile {src} (needs clang and libbpf-dev headers)"
    );
}
