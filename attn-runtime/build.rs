//! Tells the crate whether cubecl's CUDA crates carry attn's patches (vendor/README.md): the
//! patched copies declare `links` keys and publish a marker that only direct dependents see.
//! Without both markers the warpgroup kernel cannot be compiled, so it is never chosen.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(attn_warpgroup_patches)");
    let marked = |var: &str| {
        println!("cargo::rerun-if-env-changed={var}");
        std::env::var_os(var).is_some()
    };
    let llvm = marked("DEP_ATTN_PATCHED_CUBECL_LLVM_INLINE_ASM");
    let cuda = marked("DEP_ATTN_PATCHED_CUBECL_CUDA_WHOLE_PROGRAM_PTX");
    if llvm && cuda {
        println!("cargo::rustc-cfg=attn_warpgroup_patches");
    }
}
