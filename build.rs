//! Sets `cfg(nv_x86)` where the x86-64 kernels (explicit AVX2/AVX-512 intrinsics, chosen at run time) are
//! compiled: on x86-64, unless `--cfg nv_portable_only` asks for the portable code alone. That switch is how CI
//! proves the crate compiles for targets without the x86 paths (`RUSTFLAGS="--cfg nv_portable_only" cargo
//! check`), since no aarch64 toolchain can be fetched here.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(nv_x86)");
    println!("cargo::rustc-check-cfg=cfg(nv_portable_only)");
    println!("cargo::rerun-if-changed=build.rs");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let portable_only = std::env::var_os("CARGO_CFG_NV_PORTABLE_ONLY").is_some();
    if arch == "x86_64" && !portable_only {
        println!("cargo::rustc-cfg=nv_x86");
    }
}
