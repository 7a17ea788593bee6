//! GPU source text of a variant's kernel, produced without a device: CUDA C++ for an sm_90 device
//! model (cubecl's C++ compiler) and, with the `wgpu` feature, WGSL. Snapshot tests review it.

use std::sync::Arc;

use cubecl::features::{MmaConfig, Tma, WgmmaConfig, WgmmaElems};
use cubecl::ir::{
    DeviceIdentity, DeviceProperties, ElemType, FloatKind, HardwareProperties,
    MemoryDeviceProperties, VectorSize,
};
use cubecl::prelude::*;
use cubecl::Compiler;
use cubecl_cpp::shared::{register_supported_types, CompilationOptions, CppCompiler};

use crate::backward::BackwardPlan;
use crate::blueprint::{prefill_config, Family};
use crate::kernels::backward::tensor_core::{backward_dkdv_tc, backward_dq_tc};
use crate::kernels::backward::warpgroup::{
    backward_dkdv_wg, backward_dq_wg, BackwardMapsCompilationArg, SumsCompilationArg,
};
use crate::kernels::backward::{
    backward_dkdv, backward_dq, BackwardOperandsCompilationArg, BackwardShape,
    KvGradsCompilationArg, LearnConfig, QueryGradsCompilationArg,
};
use crate::kernels::common::context::{
    ArgsCompilationArg, OperandsCompilationArg, OutputsCompilationArg, RunInputsCompilationArg,
};
use crate::kernels::decode::combine::{combine_splits, CombineConfig, PartsCompilationArg};
use crate::kernels::decode::warpgroup::{
    decode_forward_wg::DecodeForwardWg, CacheMapsCompilationArg,
};
use crate::kernels::decode::{
    decode_forward, DecodeArgsCompilationArg, DecodeConfig, DecodeOperandsCompilationArg,
    DecodeOutputsCompilationArg, DecodeTiling,
};
use crate::kernels::prefill::portable::prefill_forward;
use crate::kernels::prefill::tensor_core::prefill_forward_tc;
use crate::kernels::prefill::warpgroup::{
    prefill_forward_wg, TmaOperandsCompilationArg, TmaOutputsCompilationArg,
};
use crate::kernels::prefill::PrefillConfig;
use crate::variant::{Tiling, Variant};

/// The properties of an H100/H200-class GPU (sm_90): 132 SMs, 227 KiB shared memory per block,
/// 1024 units per cube, planes of 32. Only what code generation reads matters here.
pub fn sm90_device_model() -> DeviceProperties {
    let hardware = HardwareProperties {
        load_width: 128,
        vector_register_count: None,
        plane_size_min: 32,
        plane_size_max: 32,
        max_bindings: 32,
        max_shared_memory_size: 227 * 1024,
        max_cube_count: (u32::MAX, u32::from(u16::MAX), u32::from(u16::MAX)),
        max_units_per_cube: 1024,
        max_cube_dim: (1024, 1024, 64),
        num_streaming_multiprocessors: Some(132),
        num_tensor_cores: None,
        min_tensor_cores_dim: None,
        num_cpu_cores: None,
        last_level_cache_size: None,
        max_vector_size: VectorSize::MAX,
        cube_mma_reserved_shared_memory: 0,
    };
    let mut props = DeviceProperties::new(
        Default::default(),
        MemoryDeviceProperties::new(u64::MAX, 256),
        hardware,
        cubecl::profile::TimingMethod::Device,
        DeviceIdentity {
            name: "sm_90 model".to_string(),
            fingerprint: "sm_90 model".to_string(),
            physical: None,
        },
    );
    register_supported_types(&mut props);
    // The 16×16×16 tensor-core forms the H200 reports for f16 and bf16 with f32 accumulation.
    for elem in [FloatKind::F16, FloatKind::BF16] {
        props.features.matmul.cmma.insert(MmaConfig {
            a_type: ElemType::Float(elem),
            b_type: ElemType::Float(elem),
            cd_type: ElemType::Float(FloatKind::F32),
            m: 16,
            n: 16,
            k: 16,
        });
    }
    // The warpgroup MMA forms (m 64, n 8..256 by 8, k 16) and the copy engine, as the H200 reports.
    for elem in [FloatKind::F16, FloatKind::BF16] {
        props.features.matmul.wgmma.insert(WgmmaConfig {
            elems: WgmmaElems {
                a: ElemType::Float(elem),
                b: ElemType::Float(elem),
                cd: ElemType::Float(FloatKind::F32),
            },
            m: 64,
            n_granularity: 8,
            n_max: 256,
            k: 16,
        });
    }
    props.features.tma.insert(Tma::Base);
    props
}

/// cubecl's IR of `V`'s warpgroup prefill kernel with `tiling` (sm_90 model), the form its LLVM
/// back end takes: the warpgroup MMAs and bulk tensor copies have no CUDA C++ form in cubecl, so
/// this is what the snapshots record for this kernel.
pub fn warpgroup_ir<V: Variant>(tiling: Tiling) -> String {
    let config = prefill_config(&V::SPEC, tiling);
    ir_text(
        definition::<V>(Family::Warpgroup, config, sm90_device_model()),
        "the warpgroup kernel",
    )
}

/// The IR text of a kernel definition the LLVM back end takes whole (warpgroup MMAs and bulk
/// copies have no CUDA C++ form in cubecl), asserting it expanded without errors.
fn ir_text(def: KernelDefinition, kernel: &str) -> String {
    let errors = def.body.pop_errors();
    assert!(errors.is_empty(), "{kernel} expands cleanly: {errors:?}");
    def.body.to_string()
}

/// The kernel definition of `V`'s prefill kernel of `family` for `config` on a device with
/// `props`.
fn definition<V: Variant>(
    family: Family,
    config: PrefillConfig,
    props: DeviceProperties,
) -> KernelDefinition {
    let settings = settings(family.cube_dim(&config));
    let (props, target) = (Arc::new(props), Arc::new(TargetProperties::default()));
    let operands = || OperandsCompilationArg {
        q: tensor_compilation_arg(),
        k: tensor_compilation_arg(),
        v: tensor_compilation_arg(),
    };
    let outputs = || OutputsCompilationArg {
        o: tensor_compilation_arg(),
        lse: tensor_compilation_arg(),
    };
    match family {
        Family::Portable => prefill_forward::PrefillForward::<V::Elem, V::Hooks>::new(
            settings,
            props,
            target,
            operands(),
            outputs(),
            inputs_compilation_arg(),
            args_compilation_arg(),
            config,
        )
        .define(),
        Family::TensorCores => prefill_forward_tc::PrefillForwardTc::<V::Elem, V::Hooks>::new(
            settings,
            props,
            target,
            operands(),
            outputs(),
            inputs_compilation_arg(),
            args_compilation_arg(),
            config,
        )
        .define(),
        // Tensor maps carry no compilation argument.
        Family::Warpgroup => prefill_forward_wg::PrefillForwardWg::<V::Elem, V::Hooks>::new(
            settings,
            props,
            target,
            TmaOperandsCompilationArg {
                q: (),
                k: (),
                v: (),
            },
            TmaOutputsCompilationArg {
                o_map: (),
                o: tensor_compilation_arg(),
                lse: tensor_compilation_arg(),
            },
            inputs_compilation_arg(),
            args_compilation_arg(),
            config,
        )
        .define(),
    }
}

/// The settings every kernel here is compiled with: checked execution, 32-bit addressing.
fn settings(cube_dim: CubeDim) -> KernelSettings {
    KernelSettings::new(*cube_dim, ExecutionMode::Checked, AddressType::U32)
}

/// The CUDA C++ cubecl generates for `V`'s tensor-core prefill kernel with `tiling` (sm_90 model).
pub fn cuda_source_tensor_cores<V: Variant>(tiling: Tiling) -> String {
    let config = prefill_config(&V::SPEC, tiling);
    CppCompiler::<cubecl_cpp::target::Cuda>::default()
        .compile(
            definition::<V>(Family::TensorCores, config, sm90_device_model()),
            &CompilationOptions::default(),
        )
        .expect("the tensor-core prefill kernel compiles to CUDA C++")
        .to_string()
}

fn tensor_compilation_arg() -> TensorCompilationArg {
    TensorCompilationArg {
        meta: TensorMetaCompilationArg { len: (), rank: () },
        buffer: BufferCompilationArg { inplace: None },
    }
}

fn inputs_compilation_arg() -> RunInputsCompilationArg {
    RunInputsCompilationArg {
        ints: tensor_compilation_arg(),
        floats: tensor_compilation_arg(),
        slot_len: (),
    }
}

fn args_compilation_arg() -> ArgsCompilationArg {
    ArgsCompilationArg {
        scale: (),
        group: (),
        window_left: (),
        window_right: (),
        softcap: (),
        inv_softcap: (),
        neg_inf: (),
    }
}

/// The CUDA C++ cubecl generates for `V`'s portable prefill kernel with `tiling` (sm_90 model).
pub fn cuda_source<V: Variant>(tiling: Tiling) -> String {
    let config = prefill_config(&V::SPEC, tiling);
    let def = definition::<V>(Family::Portable, config, sm90_device_model());
    CppCompiler::<cubecl_cpp::target::Cuda>::default()
        .compile(def, &CompilationOptions::default())
        .expect("the prefill kernel compiles to CUDA C++")
        .to_string()
}

/// The WGSL cubecl generates for `V`'s portable prefill kernel with `tiling` (the portable back
/// end's form).
#[cfg(feature = "wgpu")]
pub fn wgsl_source<V: Variant>(tiling: Tiling) -> String {
    let config = prefill_config(&V::SPEC, tiling);
    let mut props = sm90_device_model();
    props.hardware.plane_size_min = 8;
    props.hardware.plane_size_max = 8;
    props.hardware.max_shared_memory_size = 32 * 1024;
    let def = definition::<V>(Family::Portable, config, props);
    cubecl::wgpu::WgslCompiler
        .compile(def, &Default::default())
        .expect("the prefill kernel compiles to WGSL")
        .to_string()
}

/// The decode kernel's definition for `V` with `tiling` (paged, split over the keys; an fp8
/// cache's where `fp8`).
fn decode_definition<V: Variant>(
    tiling: DecodeTiling,
    props: DeviceProperties,
    fp8: bool,
) -> KernelDefinition {
    let spec = V::SPEC;
    let mut mask = spec.mask;
    mask.key_lengths = true;
    let config = DecodeConfig {
        tiling,
        head_dim: spec.head_dim,
        value_dim: spec.value_dim,
        mask,
        score: spec.score.flags(),
        paged: true,
        split: true,
        fp8,
        ragged: false,
    };
    decode_forward::DecodeForward::<V::Elem, V::Hooks>::new(
        settings(CubeDim::new_1d(tiling.units)),
        Arc::new(props),
        Arc::new(TargetProperties::default()),
        DecodeOperandsCompilationArg {
            q: tensor_compilation_arg(),
            k: tensor_compilation_arg(),
            v: tensor_compilation_arg(),
            k8: tensor_compilation_arg(),
            v8: tensor_compilation_arg(),
            scales: tensor_compilation_arg(),
            table: tensor_compilation_arg(),
            lengths: tensor_compilation_arg(),
            q_offsets: tensor_compilation_arg(),
        },
        decode_outputs_compilation_arg(),
        inputs_compilation_arg(),
        args_compilation_arg(),
        decode_args_compilation_arg(),
        config,
    )
    .define()
}

/// cubecl's IR of `V`'s warpgroup decode kernel with `block_kv` keys per step over a cache paged
/// in pages of `page_size` tokens (`None`: contiguous), in e4m3 or not, split over the keys
/// (sm_90 model), as [`warpgroup_ir`] records the prefill one.
pub fn decode_warpgroup_ir<V: Variant>(block_kv: u32, page_size: Option<u32>, fp8: bool) -> String {
    ir_text(
        decode_warpgroup_definition::<V>(block_kv, page_size, fp8),
        "the warpgroup decode kernel",
    )
}

/// The definition of [`decode_warpgroup_ir`]'s kernel.
fn decode_warpgroup_definition<V: Variant>(
    block_kv: u32,
    page_size: Option<u32>,
    fp8: bool,
) -> KernelDefinition {
    let config =
        crate::decode::warpgroup_decode_config(&V::SPEC, block_kv, page_size, true, false, fp8);
    if fp8 {
        decode_warpgroup_def::<V, half::f16>(config)
    } else {
        decode_warpgroup_def::<V, V::Elem>(config)
    }
}

/// [`decode_warpgroup_definition`] with MMAs in `T`.
fn decode_warpgroup_def<V: Variant, T: Float>(
    config: crate::kernels::decode::warpgroup::DecodeWgConfig,
) -> KernelDefinition {
    DecodeForwardWg::<V::Elem, T, V::Hooks>::new(
        settings(CubeDim::new_1d(
            crate::kernels::prefill::config::WARPGROUP_UNITS as u32,
        )),
        Arc::new(sm90_device_model()),
        Arc::new(TargetProperties::default()),
        CacheMapsCompilationArg {
            q: tensor_compilation_arg(),
            k: (),
            v: (),
            k8: (),
            v8: (),
            scales: tensor_compilation_arg(),
            table: tensor_compilation_arg(),
            lengths: tensor_compilation_arg(),
            q_offsets: tensor_compilation_arg(),
        },
        decode_outputs_compilation_arg(),
        inputs_compilation_arg(),
        args_compilation_arg(),
        decode_args_compilation_arg(),
        config,
    )
    .define()
}

fn decode_outputs_compilation_arg<E: Float>() -> DecodeOutputsCompilationArg<E> {
    DecodeOutputsCompilationArg {
        o: tensor_compilation_arg(),
        lse: tensor_compilation_arg(),
        part_o: tensor_compilation_arg(),
    }
}

fn decode_args_compilation_arg() -> DecodeArgsCompilationArg {
    DecodeArgsCompilationArg {
        queries: (),
        group_rows: (),
        page_size: (),
        max_pages: (),
        capacity: (),
    }
}

/// The CUDA C++ of `V`'s decode kernel with `tiling`, over a paged cache, split over the keys
/// (sm_90 model).
pub fn decode_cuda_source<V: Variant>(tiling: DecodeTiling) -> String {
    decode_cuda::<V>(tiling, false)
}

/// [`decode_cuda_source`] against an fp8 (e4m3) cache.
pub fn decode_fp8_cuda_source<V: Variant>(tiling: DecodeTiling) -> String {
    decode_cuda::<V>(tiling, true)
}

fn decode_cuda<V: Variant>(tiling: DecodeTiling, fp8: bool) -> String {
    CppCompiler::<cubecl_cpp::target::Cuda>::default()
        .compile(
            decode_definition::<V>(tiling, sm90_device_model(), fp8),
            &CompilationOptions::default(),
        )
        .expect("the decode kernel compiles to CUDA C++")
        .to_string()
}

/// The WGSL of `V`'s decode kernel with `tiling`, over a paged cache, split over the keys.
#[cfg(feature = "wgpu")]
pub fn decode_wgsl_source<V: Variant>(tiling: DecodeTiling) -> String {
    let mut props = sm90_device_model();
    props.hardware.plane_size_min = 8;
    props.hardware.plane_size_max = 8;
    props.hardware.max_shared_memory_size = 32 * 1024;
    cubecl::wgpu::WgslCompiler
        .compile(
            decode_definition::<V>(tiling, props, false),
            &Default::default(),
        )
        .expect("the decode kernel compiles to WGSL")
        .to_string()
}

/// The CUDA C++ of the split-KV combine step for elements `E`, value dim `value_dim`, with or
/// without sinks (sm_90 model).
pub fn combine_cuda_source<E: crate::tensor::Element>(value_dim: u32, sinks: bool) -> String {
    let config = CombineConfig {
        value_dim,
        units: 64,
        sinks,
    };
    let def = combine_splits::CombineSplits::<E>::new(
        settings(CubeDim::new_1d(64)),
        Arc::new(sm90_device_model()),
        Arc::new(TargetProperties::default()),
        PartsCompilationArg {
            o: tensor_compilation_arg(),
            lse: tensor_compilation_arg(),
        },
        OutputsCompilationArg {
            o: tensor_compilation_arg(),
            lse: tensor_compilation_arg(),
        },
        inputs_compilation_arg(),
        (),
        (),
        config,
    )
    .define();
    CppCompiler::<cubecl_cpp::target::Cuda>::default()
        .compile(def, &CompilationOptions::default())
        .expect("the combine kernel compiles to CUDA C++")
        .to_string()
}

/// The PTX cubecl's CUDA back end (through LLVM) makes of `V`'s warpgroup prefill kernel with
/// `tiling` for sm_90a, compiled here without a GPU: for reading the code (`ptxas -v` gives its
/// registers and spills) and for catching lowering errors before a GPU run. The error is the
/// back end's message.
#[cfg(feature = "cuda")]
pub fn warpgroup_ptx<V: Variant>(tiling: Tiling) -> Result<String, String> {
    let config = prefill_config(&V::SPEC, tiling);
    ptx(definition::<V>(
        Family::Warpgroup,
        config,
        sm90_device_model(),
    ))
}

/// The PTX of `V`'s warpgroup decode kernel at `block_kv` keys per step, paged in pages of
/// `page_size` tokens or contiguous, from an fp8 cache or not (split, sm_90a): compiled offline,
/// as [`warpgroup_ptx`].
#[cfg(feature = "cuda")]
pub fn decode_warpgroup_ptx<V: Variant>(
    block_kv: u32,
    page_size: Option<u32>,
    fp8: bool,
) -> Result<String, String> {
    ptx(decode_warpgroup_definition::<V>(block_kv, page_size, fp8))
}

/// A kernel definition compiled by cubecl's LLVM back end for sm_90a, as PTX.
#[cfg(feature = "cuda")]
fn ptx(def: KernelDefinition) -> Result<String, String> {
    use cubecl::cuda::compiler::CudaBackend;
    use cubecl::cuda::{CudaCompilationOptions, CudaCompiler, CudaRepresentation};
    let mut options = CudaCompilationOptions {
        arch: Some(cubecl::ir::nvidia::SmArch::new(90, true)),
        ..Default::default()
    };
    options.cpp.supports_features.grid_constants = true;
    match CudaCompiler::new(CudaBackend::Llvm).compile(def, &options) {
        Ok(CudaRepresentation::Llvm(module)) => {
            let bytes: Vec<u8> = module
                .ptx
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
        Ok(CudaRepresentation::Cpp(kernel)) => Ok(kernel.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The definitions of `V`'s two backward kernels (dK/dV, then dQ) of `plan` (sm_90 model); the
/// portable dQ kernel without learnable inputs.
fn backward_definitions<V: Variant>(plan: BackwardPlan) -> [KernelDefinition; 2] {
    let spec = &V::SPEC;
    let props = || Arc::new(sm90_device_model());
    let target = || Arc::new(TargetProperties::default());
    let tile = plan.tile;
    let operands = || BackwardOperandsCompilationArg {
        q: tensor_compilation_arg(),
        k: tensor_compilation_arg(),
        v: tensor_compilation_arg(),
        d_out: tensor_compilation_arg(),
        lse: tensor_compilation_arg(),
        delta: tensor_compilation_arg(),
    };
    let kv_grads = || KvGradsCompilationArg {
        dk: tensor_compilation_arg(),
        dv: tensor_compilation_arg(),
    };
    // The learnable inputs' sums, as `backward` launches them.
    let learn = crate::backward::learn_config(spec).unwrap_or_default();
    match plan.family {
        Family::Portable => {
            let config = prefill_config(spec, tile.tiling(true));
            let cube = CubeDim::new_1d(tile.resident);
            [
                backward_dkdv::BackwardDkdv::<V::Elem, V::Hooks>::new(
                    settings(cube),
                    props(),
                    target(),
                    operands(),
                    kv_grads(),
                    tensor_compilation_arg(),
                    inputs_compilation_arg(),
                    args_compilation_arg(),
                    BackwardShape::portable(config, true, learn),
                )
                .define(),
                backward_dq::BackwardDq::<V::Elem, V::Hooks>::new(
                    settings(cube),
                    props(),
                    target(),
                    operands(),
                    QueryGradsCompilationArg {
                        dq: tensor_compilation_arg(),
                        partials: tensor_compilation_arg(),
                    },
                    tensor_compilation_arg(),
                    inputs_compilation_arg(),
                    args_compilation_arg(),
                    BackwardShape::portable(config, false, learn),
                )
                .define(),
            ]
        }
        Family::TensorCores => {
            let shape = |keys: bool| BackwardShape {
                config: prefill_config(spec, tile.tiling(keys)),
                keys,
                atomic_dq: false,
                learn: LearnConfig::default(),
                splits: 1,
            };
            let cube = CubeDim::new_2d(32, tile.resident / 16);
            [
                backward_dkdv_tc::BackwardDkdvTc::<V::Elem, V::Hooks>::new(
                    settings(cube),
                    props(),
                    target(),
                    operands(),
                    kv_grads(),
                    inputs_compilation_arg(),
                    args_compilation_arg(),
                    shape(true),
                )
                .define(),
                backward_dq_tc::BackwardDqTc::<V::Elem, V::Hooks>::new(
                    settings(cube),
                    props(),
                    target(),
                    operands(),
                    tensor_compilation_arg(),
                    inputs_compilation_arg(),
                    args_compilation_arg(),
                    shape(false),
                )
                .define(),
            ]
        }
        Family::Warpgroup => {
            let shape = |keys: bool| BackwardShape {
                config: prefill_config(spec, tile.tiling(keys)),
                keys,
                atomic_dq: keys && plan.dq == crate::backward::DqSum::Atomic,
                // The dQ kernel sums the learnable inputs' gradients, as `backward` launches it.
                learn: if keys {
                    LearnConfig::default()
                } else {
                    crate::backward::learn_config(spec).unwrap_or_default()
                },
                splits: if keys { plan.kv_splits as usize } else { 1 },
            };
            // Tensor maps carry no compilation argument.
            let maps = || BackwardMapsCompilationArg {
                q: (),
                k: (),
                v: (),
                d_out: (),
                lse: tensor_compilation_arg(),
                delta: tensor_compilation_arg(),
            };
            let cube = CubeDim::new_1d(tile.resident / 64 * 128);
            [
                backward_dkdv_wg::BackwardDkdvWg::<V::Elem, V::Hooks>::new(
                    settings(cube),
                    props(),
                    target(),
                    maps(),
                    kv_grads(),
                    SumsCompilationArg {
                        dq: tensor_compilation_arg(),
                        dk: tensor_compilation_arg(),
                        dv: tensor_compilation_arg(),
                    },
                    inputs_compilation_arg(),
                    args_compilation_arg(),
                    shape(true),
                )
                .define(),
                backward_dq_wg::BackwardDqWg::<V::Elem, V::Hooks>::new(
                    settings(cube),
                    props(),
                    target(),
                    maps(),
                    QueryGradsCompilationArg {
                        dq: tensor_compilation_arg(),
                        partials: tensor_compilation_arg(),
                    },
                    inputs_compilation_arg(),
                    args_compilation_arg(),
                    shape(false),
                )
                .define(),
            ]
        }
    }
}

/// `V`'s two backward kernels (dK/dV, then dQ) of `plan`: CUDA C++ (sm_90 model) for the portable
/// and tensor-core families, cubecl's IR for the warpgroup family (no CUDA C++ form).
pub fn backward_sources<V: Variant>(plan: BackwardPlan) -> [String; 2] {
    backward_definitions::<V>(plan).map(|def| {
        if plan.family == Family::Warpgroup {
            ir_text(def, "the warpgroup backward kernels")
        } else {
            CppCompiler::<cubecl_cpp::target::Cuda>::default()
                .compile(def, &CompilationOptions::default())
                .expect("the backward kernels compile to CUDA C++")
                .to_string()
        }
    })
}
