use cudarc::driver::sys::CUDA_VERSION;

fn main() {
    // attn's patch: PTX from the LLVM back end is loaded as a whole program. Dependents that
    // link this crate directly read it as DEP_ATTN_PATCHED_CUBECL_CUDA_WHOLE_PROGRAM_PTX.
    println!("cargo::metadata=whole_program_ptx=1");
    println!("cargo::rustc-check-cfg=cfg(cuda_12050)");
    println!("cargo::rustc-check-cfg=cfg(cuda_12080)");

    if CUDA_VERSION >= 12050 {
        println!("cargo:rustc-cfg=cuda_12050");
    }
    if CUDA_VERSION >= 12080 {
        println!("cargo:rustc-cfg=cuda_12080");
    }
}
