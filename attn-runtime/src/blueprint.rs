//! The host's plan of one prefill launch — which kernel family runs, its comptime configuration,
//! its cube shape and cube count — built by one function ([`Blueprint::new`]) from a
//! [`Candidate`] (a tile shape and its family, decided once per device, variant and operand
//! alignment and cached with the tuning entry). [`crate::launch`] reads nothing else.
//!
//! Every family answers the same questions through [`KernelFamily`]: does it run this tile shape
//! for this variant on this device (and if not, why), how much shared memory a cube takes, what
//! shape the cube has. The choice between them is [`family_for`]'s alone: the fastest that fits,
//! capped by `ATTN_ENGINE`.

use cubecl::prelude::*;

use crate::error::AttnError;
use crate::inputs::Packed;
use crate::kernels::prefill::config::{MMA, PANEL, WARPGROUP_ROWS, WARPGROUP_UNITS};
use crate::kernels::prefill::PrefillConfig;
use crate::problem::Problem;
use crate::tensor::ComputeClient;
use crate::variant::{DType, Tiling, VariantSpec};

/// A prefill kernel family.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub enum Family {
    /// Scalar units, shared memory only: every back end ([`crate::kernels::prefill::portable`]).
    Portable,
    /// 16×16×16 tensor-core instructions, cubecl `cmma`
    /// ([`crate::kernels::prefill::tensor_core`]).
    TensorCores,
    /// Warpgroup tensor cores (Hopper's wgmma) fed by the bulk tensor copy engine (TMA)
    /// ([`crate::kernels::prefill::warpgroup`]).
    Warpgroup,
}

impl Family {
    /// Every family, the fastest first.
    pub const FASTEST_FIRST: [Family; 3] =
        [Family::Warpgroup, Family::TensorCores, Family::Portable];

    /// Preference among the families a device runs: the higher, the faster.
    pub const fn rank(self) -> u8 {
        match self {
            Family::Portable => 0,
            Family::TensorCores => 1,
            Family::Warpgroup => 2,
        }
    }

    /// The short name in candidate names and logs (`wg`, `tc`, `portable`).
    pub const fn short_name(self) -> &'static str {
        match self {
            Family::Warpgroup => "wg",
            Family::TensorCores => "tc",
            Family::Portable => "portable",
        }
    }

    /// Why the family cannot run `config` for `spec` on the device, or `None` when it can.
    pub fn unfit(
        self,
        client: &ComputeClient,
        spec: &VariantSpec,
        config: &PrefillConfig,
    ) -> Option<String> {
        match self {
            Family::Portable => Portable::unfit(client, spec, config),
            Family::TensorCores => TensorCores::unfit(client, spec, config),
            Family::Warpgroup => Warpgroup::unfit(client, spec, config),
        }
    }

    /// Shared memory of one cube, in bytes.
    pub fn shared_bytes(self, spec: &VariantSpec, config: &PrefillConfig) -> usize {
        match self {
            Family::Portable => Portable::shared_bytes(spec, config),
            Family::TensorCores => TensorCores::shared_bytes(spec, config),
            Family::Warpgroup => Warpgroup::shared_bytes(spec, config),
        }
    }

    /// The cube's shape.
    pub fn cube_dim(self, config: &PrefillConfig) -> CubeDim {
        match self {
            Family::Portable => Portable::cube_dim(config),
            Family::TensorCores => TensorCores::cube_dim(config),
            Family::Warpgroup => Warpgroup::cube_dim(config),
        }
    }
}

/// What every prefill kernel family answers about a tile shape.
pub trait KernelFamily {
    /// The family.
    const FAMILY: Family;

    /// Why this family cannot run `config` for `spec` on the device (element type, instructions,
    /// tile constraints, shared memory, units per cube), or `None` when it can.
    fn unfit(client: &ComputeClient, spec: &VariantSpec, config: &PrefillConfig) -> Option<String>;

    /// Shared memory of one cube, in bytes.
    fn shared_bytes(spec: &VariantSpec, config: &PrefillConfig) -> usize;

    /// The cube's shape.
    fn cube_dim(config: &PrefillConfig) -> CubeDim;
}

/// The portable family.
pub struct Portable;
/// The 16×16×16 tensor-core family.
pub struct TensorCores;
/// The warpgroup family.
pub struct Warpgroup;

/// The device's limits on a cube: `None` when a cube of `units` units and `smem` bytes fits.
pub(crate) fn cube_limits(
    client: &ComputeClient,
    name: &str,
    units: u32,
    smem: usize,
) -> Option<String> {
    let hw = &client.properties().hardware;
    if smem > hw.max_shared_memory_size {
        return Some(format!(
            "{name} needs {smem} bytes of shared memory; the device has {}",
            hw.max_shared_memory_size
        ));
    }
    if units > hw.max_units_per_cube || units > hw.max_cube_dim.0 {
        return Some(format!(
            "{name} needs {units} units per cube; the device allows {}",
            hw.max_units_per_cube.min(hw.max_cube_dim.0)
        ));
    }
    None
}

/// The cubecl element type of a 16-bit dtype (`None` for f32).
fn half_elem(dtype: DType) -> Option<cubecl::ir::ElemType> {
    use cubecl::ir::{ElemType, FloatKind};
    match dtype {
        DType::F16 => Some(ElemType::Float(FloatKind::F16)),
        DType::BF16 => Some(ElemType::Float(FloatKind::BF16)),
        DType::F32 => None,
    }
}

impl KernelFamily for Portable {
    const FAMILY: Family = Family::Portable;

    fn unfit(client: &ComputeClient, spec: &VariantSpec, config: &PrefillConfig) -> Option<String> {
        let name = format!("the portable kernel at tile {}", config.tiling.name());
        cube_limits(
            client,
            &name,
            Self::cube_dim(config).num_elems(),
            Self::shared_bytes(spec, config),
        )
    }

    fn shared_bytes(_spec: &VariantSpec, config: &PrefillConfig) -> usize {
        config.portable_shared_bytes()
    }

    fn cube_dim(config: &PrefillConfig) -> CubeDim {
        CubeDim::new_1d(config.tiling.block_q)
    }
}

/// Why `spec`'s dtype cannot run on this device's 16×16×16 tensor cores (f16 and bf16 operands,
/// f32 accumulators, planes of 32), or `None` when it can.
pub(crate) fn tensor_cores_unfit(client: &ComputeClient, spec: &VariantSpec) -> Option<String> {
    use cubecl::ir::{ElemType, FloatKind};
    let Some(elem) = half_elem(spec.dtype) else {
        return Some("the tensor-core kernels run f16 and bf16".into());
    };
    let mma = MMA as u32;
    let has_cores = client
        .features()
        .matmul
        .cmma
        .contains(&cubecl::features::MmaConfig {
            a_type: elem,
            b_type: elem,
            cd_type: ElemType::Float(FloatKind::F32),
            m: mma,
            k: mma,
            n: mma,
        });
    if !has_cores || client.properties().hardware.plane_size_max != 32 {
        return Some("the device has no 16×16×16 tensor cores on planes of 32".into());
    }
    None
}

impl KernelFamily for TensorCores {
    const FAMILY: Family = Family::TensorCores;

    fn unfit(client: &ComputeClient, spec: &VariantSpec, config: &PrefillConfig) -> Option<String> {
        if let Some(why) = tensor_cores_unfit(client, spec) {
            return Some(why);
        }
        let mma = MMA as u32;
        let t = config.tiling;
        if ![t.block_q, t.block_kv, spec.head_dim, spec.value_dim]
            .iter()
            .all(|d| d.is_multiple_of(mma))
        {
            return Some(format!(
                "the tensor-core kernel needs tiles and head dims in multiples of {MMA}"
            ));
        }
        let name = format!("the tensor-core kernel at tile {}", t.name());
        cube_limits(
            client,
            &name,
            Self::cube_dim(config).num_elems(),
            Self::shared_bytes(spec, config),
        )
    }

    fn shared_bytes(_spec: &VariantSpec, config: &PrefillConfig) -> usize {
        config.tensor_core_shared_bytes(2)
    }

    fn cube_dim(config: &PrefillConfig) -> CubeDim {
        CubeDim::new_2d(32, config.planes() as u32)
    }
}

/// Why `spec`'s dtype cannot run warpgroup MMAs of `64 × n × 16` for each `n` of `ns`, fed by
/// the copy engine, on this device and build, or `None` when it can.
pub(crate) fn warpgroup_unfit(
    client: &ComputeClient,
    spec: &VariantSpec,
    ns: &[u32],
) -> Option<String> {
    use cubecl::features::{Tma, WgmmaElems};
    use cubecl::ir::types::MatrixShape;
    use cubecl::ir::{ElemType, FloatKind};
    let Some(elem) = half_elem(spec.dtype) else {
        return Some("the warpgroup kernels run f16 and bf16".into());
    };
    let features = client.features();
    let elems = WgmmaElems {
        a: elem,
        b: elem,
        cd: ElemType::Float(FloatKind::F32),
    };
    let mma = |n: u32| {
        features.matmul.wgmma.iter().any(|c| {
            c.matches(
                elems,
                MatrixShape {
                    m: WARPGROUP_ROWS,
                    n: n as usize,
                    k: 16,
                },
            )
        })
    };
    if !features.tma.contains(Tma::Base)
        || !ns.iter().all(|&n| mma(n))
        || client.properties().hardware.plane_size_max != 32
    {
        return Some("the device has no warpgroup MMAs and copy engine".into());
    }
    if !warpgroup_compiles() {
        return Some("this build links cubecl crates without attn's patches".into());
    }
    None
}

impl KernelFamily for Warpgroup {
    const FAMILY: Family = Family::Warpgroup;

    /// 16-bit elements, warpgroup MMAs of `64 × block_kv` and `64 × value_dim` and the copy
    /// engine on the device, 64 or 128 query rows, 64 to 256 keys per step in multiples of 16,
    /// head dims in multiples of 64 up to 256 (the output and a step's scores stay in registers:
    /// past a value dim of 128, steps of at most 64 keys), its shared memory, and a build that
    /// can compile it (see [`WARPGROUP_BUILT`]).
    fn unfit(client: &ComputeClient, spec: &VariantSpec, config: &PrefillConfig) -> Option<String> {
        let t = config.tiling;
        if let Some(why) = warpgroup_unfit(client, spec, &[t.block_kv, spec.value_dim]) {
            return Some(why);
        }
        let dims = |d: u32| d.is_multiple_of(PANEL as u32) && d <= 256;
        let shape_ok = (t.block_q == 64 || t.block_q == 128)
            && t.block_kv.is_multiple_of(16)
            && (64..=256).contains(&t.block_kv)
            && dims(spec.head_dim)
            && dims(spec.value_dim)
            // Past value dim 128 the output takes 128 registers a unit: steps of at most 64 keys
            // keep the scores and probabilities beside it.
            && (spec.value_dim <= 128 || t.block_kv <= 64);
        if !shape_ok {
            return Some(format!(
                "the warpgroup kernel does not run tile {} at head dims {}/{}",
                t.name(),
                spec.head_dim,
                spec.value_dim
            ));
        }
        let name = format!("the warpgroup kernel at tile {}", t.name());
        if let Some(why) = cube_limits(
            client,
            &name,
            Self::cube_dim(config).num_elems(),
            Self::shared_bytes(spec, config),
        ) {
            return Some(why);
        }
        None
    }

    fn shared_bytes(_spec: &VariantSpec, config: &PrefillConfig) -> usize {
        config.warpgroup_shared_bytes()
    }

    fn cube_dim(config: &PrefillConfig) -> CubeDim {
        CubeDim::new_1d(config.warpgroups() as u32 * WARPGROUP_UNITS as u32)
    }
}

/// Whether this build can compile the warpgroup kernel: cubecl's CUDA crates must carry attn's
/// patches (vendor/README.md), which a crate depending on attn gets only through the same
/// `[patch.crates-io]` lines as this workspace. Without them the tensor-core kernel runs, and the
/// first call that would have taken the warpgroup kernel says once how to enable it.
fn warpgroup_compiles() -> bool {
    if cfg!(attn_warpgroup_patches) {
        return true;
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        tracing::warn!(
            "attn: this device runs attn's warpgroup (Hopper) kernel, but this build links the \
             published cubecl-cuda and cubecl-llvm, which cannot compile it; the tensor-core \
             kernel runs instead. To enable the fast path, add attn's two patched crates to your \
             workspace's Cargo.toml: [patch.crates-io] cubecl-llvm = {{ path = \".../vendor/cubecl-llvm\" }} \
             and cubecl-cuda = {{ path = \".../vendor/cubecl-cuda\" }} (see attn's README, \"Depending on attn\")"
        );
    });
    false
}

/// Whether the warpgroup kernel family is compiled into this build (see [`Warpgroup`]).
pub const WARPGROUP_BUILT: bool = cfg!(attn_warpgroup_patches);

/// `ATTN_ENGINE=portable` forces the portable kernel, `ATTN_ENGINE=tc` caps at the 16×16×16
/// tensor-core kernel (for comparisons and diagnosis); read once, here only.
pub(crate) fn family_cap() -> Family {
    static CAP: std::sync::OnceLock<Family> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| match std::env::var("ATTN_ENGINE").as_deref() {
        Ok("portable") => Family::Portable,
        Ok("tc") => Family::TensorCores,
        _ => Family::Warpgroup,
    })
}

/// The comptime configuration of `spec`'s prefill kernels for `tiling`.
pub fn prefill_config(spec: &VariantSpec, tiling: Tiling) -> PrefillConfig {
    PrefillConfig {
        tiling,
        head_dim: spec.head_dim,
        value_dim: spec.value_dim,
        mask: spec.mask,
        score: spec.score.flags(),
    }
}

/// The family that runs `tiling` for `spec` on this device: the fastest that fits, capped by
/// `ATTN_ENGINE`; the warpgroup family only for operands the copy engine can read
/// (`copy_engine`: every stride and the views' starts multiples of 16 bytes). The error says why
/// the portable kernel, the last resort, does not fit.
pub fn family_for(
    client: &ComputeClient,
    spec: &VariantSpec,
    tiling: Tiling,
    copy_engine: bool,
) -> Result<Family, AttnError> {
    let config = prefill_config(spec, tiling);
    let cap = family_cap();
    let mut why = String::new();
    for family in Family::FASTEST_FIRST {
        if family.rank() > cap.rank() || (family == Family::Warpgroup && !copy_engine) {
            continue;
        }
        match family.unfit(client, spec, &config) {
            None => return Ok(family),
            Some(reason) => why = reason,
        }
    }
    Err(AttnError::Unsupported(format!("{}: {why}", spec.name)))
}

/// A tile shape and the kernel family that runs it on the device: what the tuner times and caches.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct Candidate {
    /// The tile shape.
    pub tiling: Tiling,
    /// The kernel family.
    pub family: Family,
}

impl Candidate {
    /// `tiling` for `spec` on this device, on the family that runs it.
    pub fn on(
        client: &ComputeClient,
        spec: &VariantSpec,
        tiling: Tiling,
        copy_engine: bool,
    ) -> Result<Candidate, AttnError> {
        Ok(Candidate {
            tiling,
            family: family_for(client, spec, tiling, copy_engine)?,
        })
    }
}

impl std::fmt::Display for Candidate {
    /// The stable name the persistent cache is keyed on: `wg_q128_kv128`, `tc_q64_kv16`,
    /// `portable_q32_kv32`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}_{}", self.family.short_name(), self.tiling.name())
    }
}

/// Everything a prefill launch needs to know besides its tensors.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub struct Blueprint {
    /// The kernel family.
    pub family: Family,
    /// Its comptime configuration.
    pub config: PrefillConfig,
    /// The cube's shape.
    pub cube_dim: CubeDim,
    /// Cubes along x (query blocks), y (query heads) and z (sequences or documents).
    pub cube_count: (u32, u32, u32),
}

impl Blueprint {
    /// The blueprint of one call running `candidate`.
    pub fn new(
        spec: &VariantSpec,
        candidate: Candidate,
        problem: &Problem,
        packed: &Packed,
    ) -> Blueprint {
        let config = prefill_config(spec, candidate.tiling);
        Blueprint {
            family: candidate.family,
            config,
            cube_dim: candidate.family.cube_dim(&config),
            cube_count: (
                packed.max_seq_q.div_ceil(candidate.tiling.block_q as usize) as u32,
                problem.heads_q as u32,
                packed.sequences as u32,
            ),
        }
    }

    /// Cubes in the grid.
    pub fn cubes(&self) -> usize {
        let (x, y, z) = self.cube_count;
        x as usize * y as usize * z as usize
    }
}
