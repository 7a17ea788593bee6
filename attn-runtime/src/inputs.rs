//! Run-time inputs of a variant: per-sequence key lengths, document offsets, prefix lengths,
//! sink logits, ALiBi slopes and the inputs a declaration names for its expressions. Checked on
//! the host against the problem, then packed into two small device buffers (`i32` and `f32`) of
//! fixed slots that the kernels and the generated hooks index.

use crate::error::AttnError;
use crate::problem::Problem;
use crate::variant::{Alibi, InputShape, InputType, VariantSpec};

/// Slot numbers in the packed input buffers. Built-in inputs have fixed slots; a variant's own
/// inputs follow, in declaration order, per element type.
pub mod slots {
    /// `i32` slot: key length per sequence.
    pub const KEY_LENGTHS: u32 = 0;
    /// `i32` slot: query offsets of packed documents (`docs + 1` values).
    pub const Q_OFFSETS: u32 = 1;
    /// `i32` slot: key offsets of packed documents (`docs + 1` values).
    pub const K_OFFSETS: u32 = 2;
    /// `i32` slot: prefix length per sequence (prefix-LM).
    pub const PREFIX_LENGTHS: u32 = 3;
    /// `i32` slot: where the tables lie (inputs with an inner dimension, or with both a batch
    /// and a head one): the positions a `seq` dimension holds, the query heads, then each
    /// declared input's first value in its buffer, by declaration index. Tables follow the
    /// slots in their buffer, row-major.
    pub const TABLES: u32 = 4;
    /// First `i32` slot of the variant's own inputs.
    pub const FIRST_CUSTOM_INT: u32 = 5;
    /// `f32` slot: sink logit per query head.
    pub const SINKS: u32 = 0;
    /// `f32` slot: ALiBi slope per query head.
    pub const ALIBI_SLOPES: u32 = 1;
    /// First `f32` slot of the variant's own inputs.
    pub const FIRST_CUSTOM_FLOAT: u32 = 2;
}

/// The run-time inputs of one call. Variants generate a typed struct with exactly the fields
/// they need and convert it into this; variants without inputs pass `Inputs::default()`.
#[derive(Clone, Debug, Default)]
pub struct Inputs<'a> {
    /// Key length per sequence, `[B]` (`mask: key_lengths`).
    pub key_lengths: Option<&'a [i32]>,
    /// Start of each document among the packed queries and the total, `[docs + 1]`
    /// (`mask: documents`; cu_seqlens).
    pub q_offsets: Option<&'a [i32]>,
    /// Start of each document among the packed keys and the total, `[docs + 1]`.
    pub k_offsets: Option<&'a [i32]>,
    /// Prefix length per sequence, `[B]` (`mask: prefix_lm`).
    pub prefix_lengths: Option<&'a [i32]>,
    /// Sink logit per query head, `[Hq]` (`sinks: per_head`).
    pub sinks: Option<&'a [f32]>,
    /// ALiBi slope per query head, `[Hq]` (`alibi: given`).
    pub alibi_slopes: Option<&'a [f32]>,
    /// The variant's own `i32` inputs, in declaration order (a scalar is a 1-element slice).
    pub ints: Vec<&'a [i32]>,
    /// The variant's own `f32` inputs, in declaration order.
    pub floats: Vec<&'a [f32]>,
    /// The query heads and the positions a `seq` dimension holds, by which the host forms of
    /// the expressions index tables; the runtime fills them in ([`Inputs::with_dims`]), callers
    /// leave the default.
    #[doc(hidden)]
    pub dims: (usize, usize),
}

impl<'a> Inputs<'a> {
    /// The same inputs, with the extents tables are indexed by for problem `p`.
    pub fn with_dims(&self, p: &Problem) -> Inputs<'a> {
        Inputs {
            dims: (p.heads_q, positions(p)),
            ..self.clone()
        }
    }
}

/// The values a `seq` dimension holds: the longer of Q's and K's sequence dimension (the
/// packed totals for documents).
pub fn positions(p: &Problem) -> usize {
    p.seq_q.max(p.seq_k)
}

/// The element a table read takes on the host: `at` is `[b, h, inner index]`, the inner index
/// clamped to the dimension's ends as the kernels do.
pub fn table_entry(shape: InputShape, inputs: &Inputs, at: [i64; 3]) -> usize {
    let (heads, positions) = inputs.dims;
    let len = shape.inner_len(positions).max(1) as i64;
    let mut outer = 0;
    if shape.per_batch {
        outer = at[0];
    }
    if shape.per_head {
        outer = outer * if shape.per_batch { heads as i64 } else { 1 } + at[1];
    }
    (outer * len + at[2].clamp(0, len - 1)) as usize
}

/// The checked, packed form of a call's inputs, and the sequence geometry they imply.
#[derive(Clone, Debug, PartialEq)]
pub struct Packed {
    /// Sequences the grid covers: the batch, or the number of documents.
    pub sequences: usize,
    /// The longest query sequence (documents) or `seq_q`.
    pub max_seq_q: usize,
    /// Values per slot.
    pub slot_len: usize,
    /// `i32` slots, `slot_len` values each.
    pub ints: Vec<i32>,
    /// `f32` slots, `slot_len` values each.
    pub floats: Vec<f32>,
}

impl Packed {
    /// The document (or batch entry) lengths as `(q_offset, seq_q, k_offset, seq_k)` per sequence,
    /// with key lengths applied: what the kernel computes from the slots, for the reference.
    pub fn sequence(
        &self,
        spec: &VariantSpec,
        p: &Problem,
        s: usize,
    ) -> (usize, usize, usize, usize) {
        let at = |slot: u32, i: usize| self.ints[slot as usize * self.slot_len + i] as usize;
        let (q_off, seq_q, k_off, mut seq_k) = if spec.mask.documents {
            let (q0, q1) = (at(slots::Q_OFFSETS, s), at(slots::Q_OFFSETS, s + 1));
            let (k0, k1) = (at(slots::K_OFFSETS, s), at(slots::K_OFFSETS, s + 1));
            (q0, q1 - q0, k0, k1 - k0)
        } else {
            (0, p.seq_q, 0, p.seq_k)
        };
        if spec.mask.key_lengths {
            seq_k = at(slots::KEY_LENGTHS, s);
        }
        (q_off, seq_q, k_off, seq_k)
    }
}

/// Checks `inputs` against the variant and the problem; packs them for the device.
pub fn pack(spec: &VariantSpec, p: &Problem, inputs: &Inputs) -> Result<Packed, AttnError> {
    let mask = &spec.mask;
    let mut sequences = p.batch;
    let mut max_seq_q = p.seq_q;
    let mut offsets = None;
    if mask.documents {
        let q_off = required("q_offsets", inputs.q_offsets)?;
        let k_off = required("k_offsets", inputs.k_offsets)?;
        if p.batch != 1 {
            return Err(AttnError::Input {
                input: "q_offsets",
                reason: format!(
                    "packed documents are one sequence: q, k and v need batch 1, found {}",
                    p.batch
                ),
            });
        }
        check_offsets("q_offsets", q_off, p.seq_q, "q's sequence length")?;
        check_offsets("k_offsets", k_off, p.seq_k, "k's sequence length")?;
        if q_off.len() != k_off.len() {
            return Err(AttnError::Input {
                input: "k_offsets",
                reason: format!(
                    "{} documents of keys but {} of queries",
                    k_off.len() - 1,
                    q_off.len() - 1
                ),
            });
        }
        sequences = q_off.len() - 1;
        // One cube row of the launch grid per document.
        if sequences > u16::MAX as usize {
            return Err(AttnError::TooLarge {
                what: "the number of documents",
                found: sequences,
                max: u16::MAX as usize,
            });
        }
        max_seq_q = q_off
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0);
        offsets = Some((q_off, k_off));
    } else {
        unexpected("q_offsets", inputs.q_offsets, "documents")?;
        unexpected("k_offsets", inputs.k_offsets, "documents")?;
    }
    let slot_len = (sequences + 1)
        .max(p.heads_q)
        .max(2 + spec.inputs.len())
        .max(1);
    let (int_slots, float_slots) = used_slots(spec);
    // At least one value each: a device buffer cannot be empty. A variant without run-time inputs
    // uploads two values per call.
    let mut ints = vec![0i32; (int_slots * slot_len).max(1)];
    let mut floats = vec![0f32; (float_slots * slot_len).max(1)];
    let mut put_int = |slot: u32, data: &[i32]| {
        let at = slot as usize * slot_len;
        ints[at..at + data.len()].copy_from_slice(data);
    };
    if let Some((q_off, k_off)) = offsets {
        put_int(slots::Q_OFFSETS, q_off);
        put_int(slots::K_OFFSETS, k_off);
    }
    let seq_k_of = |s: usize| match offsets {
        Some((_, k_off)) => (k_off[s + 1] - k_off[s]) as i64,
        None => p.seq_k as i64,
    };
    if mask.key_lengths {
        let lengths = required("key_lengths", inputs.key_lengths)?;
        per_sequence("key_lengths", lengths, sequences)?;
        for (s, &len) in lengths.iter().enumerate() {
            if len < 0 || len as i64 > seq_k_of(s) {
                return Err(AttnError::Input {
                    input: "key_lengths",
                    reason: format!(
                        "entry {s} is {len}; a key length lies between 0 and the {} keys there",
                        seq_k_of(s)
                    ),
                });
            }
        }
        put_int(slots::KEY_LENGTHS, lengths);
    } else {
        unexpected("key_lengths", inputs.key_lengths, "key_lengths")?;
    }
    if mask.prefix_lm {
        let prefix = required("prefix_lengths", inputs.prefix_lengths)?;
        per_sequence("prefix_lengths", prefix, sequences)?;
        if let Some(s) = prefix.iter().position(|&l| l < 0) {
            return Err(AttnError::Input {
                input: "prefix_lengths",
                reason: format!("entry {s} is {}; a prefix length is at least 0", prefix[s]),
            });
        }
        put_int(slots::PREFIX_LENGTHS, prefix);
    } else {
        unexpected("prefix_lengths", inputs.prefix_lengths, "prefix_lm")?;
    }
    let mut put_float = |slot: u32, data: &[f32]| {
        let at = slot as usize * slot_len;
        floats[at..at + data.len()].copy_from_slice(data);
    };
    if spec.score.sinks {
        let sinks = required("sinks", inputs.sinks)?;
        per_head("sinks", sinks, p.heads_q)?;
        finite("sinks", sinks)?;
        put_float(slots::SINKS, sinks);
    } else {
        unexpected("sinks", inputs.sinks, "sinks")?;
    }
    match spec.score.alibi {
        Some(Alibi::Given) => {
            let slopes = required("alibi_slopes", inputs.alibi_slopes)?;
            per_head("alibi_slopes", slopes, p.heads_q)?;
            finite("alibi_slopes", slopes)?;
            put_float(slots::ALIBI_SLOPES, slopes);
        }
        Some(Alibi::Geometric) => {
            unexpected("alibi_slopes", inputs.alibi_slopes, "alibi: given")?;
            put_float(slots::ALIBI_SLOPES, &alibi_slopes(p.heads_q));
        }
        None => unexpected("alibi_slopes", inputs.alibi_slopes, "alibi")?,
    }
    let mut packed = Packed {
        sequences,
        max_seq_q,
        slot_len,
        ints,
        floats,
    };
    pack_custom(spec, p, inputs, &mut packed)?;
    Ok(packed)
}

/// The variant's own inputs into their slots (or, for tables, after the slots, their places
/// noted in [`slots::TABLES`]), each checked for its declared shape.
fn pack_custom(
    spec: &VariantSpec,
    p: &Problem,
    inputs: &Inputs,
    packed: &mut Packed,
) -> Result<(), AttnError> {
    let (sequences, slot_len) = (packed.sequences, packed.slot_len);
    let (ints, floats) = (&mut packed.ints, &mut packed.floats);
    let (mut next_int, mut next_float) = (0, 0);
    let positions = positions(p);
    let tables = slots::TABLES as usize * slot_len;
    if spec.inputs.iter().any(|d| d.shape.is_table()) {
        ints[tables] = positions as i32;
        ints[tables + 1] = p.heads_q as i32;
    }
    for (n, decl) in spec.inputs.iter().enumerate() {
        let shape = decl.shape;
        let expected = shape.len(sequences, p.heads_q, positions);
        let what = describe(shape, decl.ty, [sequences, p.heads_q, positions]);
        let data = match decl.ty {
            InputType::I32 => inputs.ints.get(next_int).copied().map(Either::Int),
            InputType::F32 => inputs.floats.get(next_float).copied().map(Either::Float),
        };
        let data = data.ok_or(AttnError::Input {
            input: decl.name,
            reason: "the variant declares it, but none was given".into(),
        })?;
        if data.len() != expected {
            return Err(AttnError::Input {
                input: decl.name,
                reason: format!("holds {} values; {what} expected", data.len()),
            });
        }
        // A slot of its own, or a table after everything in its buffer.
        let slot = |first: u32, next: usize| {
            (!shape.is_table()).then_some((first as usize + next) * slot_len)
        };
        let at = match data {
            Either::Int(data) => {
                next_int += 1;
                put(ints, data, slot(slots::FIRST_CUSTOM_INT, next_int - 1))
            }
            Either::Float(data) => {
                finite(decl.name, data)?;
                next_float += 1;
                put(
                    floats,
                    data,
                    slot(slots::FIRST_CUSTOM_FLOAT, next_float - 1),
                )
            }
        };
        if shape.is_table() {
            ints[tables + 2 + n] = to_i32(at)?;
        }
    }
    if inputs.ints.len() != next_int || inputs.floats.len() != next_float {
        return Err(AttnError::Input {
            input: "inputs",
            reason: format!(
                "{} i32 and {} f32 inputs given; the variant declares {next_int} and {next_float}",
                inputs.ints.len(),
                inputs.floats.len()
            ),
        });
    }
    Ok(())
}

/// Puts `data` at `slot` of `buffer`, or after everything in it without one; returns where.
fn put<T: Copy>(buffer: &mut Vec<T>, data: &[T], slot: Option<usize>) -> usize {
    match slot {
        Some(at) => {
            buffer[at..at + data.len()].copy_from_slice(data);
            at
        }
        None => {
            buffer.extend_from_slice(data);
            buffer.len() - data.len()
        }
    }
}

/// One declared input's values, of either element type.
enum Either<'a> {
    Int(&'a [i32]),
    Float(&'a [f32]),
}

impl Either<'_> {
    fn len(&self) -> usize {
        match self {
            Either::Int(d) => d.len(),
            Either::Float(d) => d.len(),
        }
    }
}

/// What an input of `shape` holds, for messages: "one per query head (8)", "`[f32; heads, 32]`:
/// 8 query heads × 32 = 256 values".
fn describe(shape: InputShape, ty: InputType, [sequences, heads, positions]: [usize; 3]) -> String {
    use crate::variant::Inner;
    match (shape.per_batch, shape.per_head, shape.inner) {
        (false, false, Inner::None) => return "a single value".to_string(),
        (true, false, Inner::None) => return format!("one per sequence ({sequences})"),
        (false, true, Inner::None) => return format!("one per query head ({heads})"),
        _ => {}
    }
    let names = [
        format!("{sequences} sequences"),
        format!("{heads} query heads"),
        format!("{positions} positions"),
    ];
    let dims = shape.dims([&names[0], &names[1], &names[2]]);
    format!(
        "`{}`: {} = {} values",
        shape.declared(if ty == InputType::I32 { "i32" } else { "f32" }),
        dims.join(" × "),
        shape.len(sequences, heads, positions)
    )
}

/// A table's place in its buffer as the `i32` the kernels read.
fn to_i32(at: usize) -> Result<i32, AttnError> {
    i32::try_from(at).map_err(|_| AttnError::TooLarge {
        what: "the run-time inputs' values",
        found: at,
        max: i32::MAX as usize,
    })
}

/// The standard ALiBi slopes for `heads` query heads: `2^(−8(h+1)/n)` when `n` is a power of
/// two; otherwise those of the largest power of two below `n`, then every other slope of twice
/// that (Press et al., 2022).
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    fn power_of_two(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-8.0 / n as f64);
        (1..=n).map(|i| start.powi(i as i32)).collect()
    }
    let closest = 1usize << heads.max(1).ilog2();
    let mut slopes = power_of_two(closest);
    if closest < heads {
        let extra = power_of_two(2 * closest);
        slopes.extend(extra.iter().step_by(2).take(heads - closest));
    }
    slopes.into_iter().map(|s| s as f32).collect()
}

/// How many `i32` and `f32` slots the variant reads: up to its highest slot in use (the built-in
/// slots have fixed numbers).
fn used_slots(spec: &VariantSpec) -> (usize, usize) {
    let count = |ty| spec.inputs.iter().filter(|d| d.ty == ty).count();
    let mask = &spec.mask;
    let custom_ints = count(InputType::I32);
    let int_slots = if custom_ints > 0 {
        slots::FIRST_CUSTOM_INT as usize + custom_ints
    } else if spec.inputs.iter().any(|d| d.shape.is_table()) {
        slots::TABLES as usize + 1
    } else if mask.prefix_lm {
        slots::PREFIX_LENGTHS as usize + 1
    } else if mask.documents {
        slots::K_OFFSETS as usize + 1
    } else if mask.key_lengths {
        slots::KEY_LENGTHS as usize + 1
    } else {
        0
    };
    let custom_floats = count(InputType::F32);
    let float_slots = if custom_floats > 0 {
        slots::FIRST_CUSTOM_FLOAT as usize + custom_floats
    } else if spec.score.alibi.is_some() {
        slots::ALIBI_SLOPES as usize + 1
    } else if spec.score.sinks {
        slots::SINKS as usize + 1
    } else {
        0
    };
    (int_slots, float_slots)
}

fn required<'a, T>(input: &'static str, value: Option<&'a [T]>) -> Result<&'a [T], AttnError> {
    value.ok_or(AttnError::Input {
        input,
        reason: "the variant needs it, but none was given".into(),
    })
}

fn unexpected<T>(input: &'static str, value: Option<&[T]>, term: &str) -> Result<(), AttnError> {
    match value {
        Some(_) => Err(AttnError::Input {
            input,
            reason: format!("given, but the variant does not declare `{term}`"),
        }),
        None => Ok(()),
    }
}

fn per_sequence(input: &'static str, data: &[i32], sequences: usize) -> Result<(), AttnError> {
    if data.len() == sequences {
        return Ok(());
    }
    Err(AttnError::Input {
        input,
        reason: format!(
            "holds {} values; one per sequence ({sequences}) expected",
            data.len()
        ),
    })
}

fn per_head(input: &'static str, data: &[f32], heads: usize) -> Result<(), AttnError> {
    if data.len() == heads {
        return Ok(());
    }
    Err(AttnError::Input {
        input,
        reason: format!(
            "holds {} values; one per query head ({heads}) expected",
            data.len()
        ),
    })
}

fn finite(input: &'static str, data: &[f32]) -> Result<(), AttnError> {
    match data.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(AttnError::Input {
            input,
            reason: format!("entry {i} is {}; values must be finite", data[i]),
        }),
        None => Ok(()),
    }
}

/// Offsets start at 0, never decrease and end at the packed length.
fn check_offsets(
    input: &'static str,
    offsets: &[i32],
    total: usize,
    what: &str,
) -> Result<(), AttnError> {
    let fail = |reason: String| Err(AttnError::Input { input, reason });
    if offsets.len() < 2 {
        return fail(format!(
            "holds {} values; documents + 1 (at least 2) expected",
            offsets.len()
        ));
    }
    if offsets[0] != 0 {
        return fail(format!(
            "starts at {}; the first document starts at 0",
            offsets[0]
        ));
    }
    if let Some(i) = offsets.windows(2).position(|w| w[1] < w[0]) {
        return fail(format!(
            "decreases from {} to {} at entry {}",
            offsets[i],
            offsets[i + 1],
            i + 1
        ));
    }
    let last = *offsets.last().expect("at least 2 values");
    if last as usize != total {
        return fail(format!("ends at {last}, but {what} is {total}"));
    }
    Ok(())
}

/// Run-time inputs owned rather than borrowed: what a call keeps for later (the burn adapter's
/// backward), or what a test builds (`reference::OwnedInputs::random`).
#[derive(Clone, Debug, Default)]
pub struct OwnedInputs {
    /// Key length per sequence.
    pub key_lengths: Option<Vec<i32>>,
    /// Query offsets of packed documents.
    pub q_offsets: Option<Vec<i32>>,
    /// Key offsets of packed documents.
    pub k_offsets: Option<Vec<i32>>,
    /// Prefix length per sequence.
    pub prefix_lengths: Option<Vec<i32>>,
    /// Sink logit per head.
    pub sinks: Option<Vec<f32>>,
    /// ALiBi slope per head.
    pub alibi_slopes: Option<Vec<f32>>,
    /// The variant's own i32 inputs.
    pub ints: Vec<Vec<i32>>,
    /// The variant's own f32 inputs.
    pub floats: Vec<Vec<f32>>,
}

impl OwnedInputs {
    /// Borrowed as the launcher takes them.
    pub fn view(&self) -> Inputs<'_> {
        Inputs {
            key_lengths: self.key_lengths.as_deref(),
            q_offsets: self.q_offsets.as_deref(),
            k_offsets: self.k_offsets.as_deref(),
            prefix_lengths: self.prefix_lengths.as_deref(),
            sinks: self.sinks.as_deref(),
            alibi_slopes: self.alibi_slopes.as_deref(),
            ints: self.ints.iter().map(Vec::as_slice).collect(),
            floats: self.floats.iter().map(Vec::as_slice).collect(),
            dims: (0, 0),
        }
    }

    /// An owned copy of `inputs`.
    pub fn of(inputs: &Inputs) -> OwnedInputs {
        OwnedInputs {
            key_lengths: inputs.key_lengths.map(<[i32]>::to_vec),
            q_offsets: inputs.q_offsets.map(<[i32]>::to_vec),
            k_offsets: inputs.k_offsets.map(<[i32]>::to_vec),
            prefix_lengths: inputs.prefix_lengths.map(<[i32]>::to_vec),
            sinks: inputs.sinks.map(<[f32]>::to_vec),
            alibi_slopes: inputs.alibi_slopes.map(<[f32]>::to_vec),
            ints: inputs.ints.iter().map(|v| v.to_vec()).collect(),
            floats: inputs.floats.iter().map(|v| v.to_vec()).collect(),
        }
    }
}
