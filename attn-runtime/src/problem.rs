//! Run-time shapes, strides and head counts, validated against a variant before anything launches.

use crate::error::{AttnError, Dim, Operand};
use crate::tensor::Tensor;
use crate::variant::{HeadGrouping, VariantSpec};

/// A validated attention problem: every number the launcher needs, all checked.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub struct Problem {
    /// Batch size.
    pub batch: usize,
    /// Query heads.
    pub heads_q: usize,
    /// K/V heads.
    pub heads_kv: usize,
    /// Query heads per K/V head.
    pub group: usize,
    /// Query length.
    pub seq_q: usize,
    /// Key length.
    pub seq_k: usize,
    /// Head dimension of Q and K.
    pub head_dim: usize,
    /// Head dimension of V and O.
    pub value_dim: usize,
}

/// The largest extent of a launch-grid axis and of an index, so 32-bit grids never overflow.
const MAX_EXTENT: usize = u16::MAX as usize;

impl Problem {
    /// Checks Q, K and V against the variant and each other; the first problem found is returned.
    pub fn new<E>(
        spec: &VariantSpec,
        q: &Tensor<E>,
        k: &Tensor<E>,
        v: &Tensor<E>,
    ) -> Result<Self, AttnError>
    where
        E: crate::tensor::Element,
    {
        for (operand, t) in [(Operand::Q, q), (Operand::K, k), (Operand::V, v)] {
            check_view(operand, t.shape(), t.strides(), t.buffer_len())?;
            let d = t.shape()[3];
            let (expected, why) = match operand {
                Operand::V => (spec.value_dim as usize, "the variant's value_dim"),
                _ => (spec.head_dim as usize, "the variant's head_dim"),
            };
            if d != expected {
                return Err(AttnError::DimMismatch {
                    operand,
                    dim: Dim::HeadDim,
                    expected,
                    found: d,
                    why,
                });
            }
        }
        let [batch, heads_q, seq_q, head_dim] = q.shape();
        let [_, heads_kv, seq_k, _] = k.shape();
        same(Operand::K, Dim::Batch, batch, k.shape()[0], "q's batch")?;
        same(Operand::V, Dim::Batch, batch, v.shape()[0], "q's batch")?;
        same(Operand::V, Dim::Heads, heads_kv, v.shape()[1], "k's heads")?;
        same(
            Operand::V,
            Dim::Seq,
            seq_k,
            v.shape()[2],
            "k's sequence length",
        )?;
        let group = check_grouping(spec.heads, heads_q, heads_kv)?;
        for (what, found) in [("q's heads", heads_q), ("batch", batch)] {
            if found > MAX_EXTENT {
                return Err(AttnError::TooLarge {
                    what,
                    found,
                    max: MAX_EXTENT,
                });
            }
        }
        Ok(Self {
            batch,
            heads_q,
            heads_kv,
            group,
            seq_q,
            seq_k,
            head_dim,
            value_dim: v.shape()[3],
        })
    }

    /// Shape of O: `[batch, heads_q, seq_q, value_dim]`.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.heads_q, self.seq_q, self.value_dim]
    }

    /// Shape of the LSE: `[batch, heads_q, seq_q]`.
    pub fn lse_shape(&self) -> [usize; 3] {
        [self.batch, self.heads_q, self.seq_q]
    }
}

/// The rule of each head grouping, checked on the run-time head counts; returns the group size.
fn check_grouping(heads: HeadGrouping, hq: usize, hkv: usize) -> Result<usize, AttnError> {
    let fail = |rule: String| Err(AttnError::HeadGrouping { hq, hkv, rule });
    match heads {
        HeadGrouping::Mha if hq != hkv => fail("the variant is mha, so they must be equal".into()),
        HeadGrouping::Mha => Ok(1),
        HeadGrouping::Mqa if hkv != 1 => {
            fail("the variant is mqa, so k/v must have exactly 1 head".into())
        }
        HeadGrouping::Mqa => Ok(hq),
        HeadGrouping::Gqa { group } if hq != group as usize * hkv => fail(format!(
            "the variant is gqa(group = {group}), so q needs {group} × k/v heads"
        )),
        HeadGrouping::Gqa { group } => Ok(group as usize),
    }
}

fn same(
    operand: Operand,
    dim: Dim,
    expected: usize,
    found: usize,
    why: &'static str,
) -> Result<(), AttnError> {
    if expected == found {
        Ok(())
    } else {
        Err(AttnError::DimMismatch {
            operand,
            dim,
            expected,
            found,
            why,
        })
    }
}

/// Non-empty, contiguous along head_dim, and inside its buffer.
pub(crate) fn check_view(
    operand: Operand,
    shape: [usize; 4],
    strides: [usize; 4],
    len: usize,
) -> Result<(), AttnError> {
    for (dim, extent) in [Dim::Batch, Dim::Heads, Dim::Seq, Dim::HeadDim]
        .into_iter()
        .zip(shape)
    {
        if extent == 0 {
            return Err(AttnError::EmptyDim { operand, dim });
        }
    }
    if strides[3] != 1 {
        return Err(AttnError::NotContiguous {
            operand,
            stride: strides[3],
        });
    }
    let needed = shape
        .iter()
        .zip(strides)
        .map(|(&n, s)| (n - 1).saturating_mul(s))
        .fold(1usize, usize::saturating_add);
    if needed > len {
        return Err(AttnError::OutOfBounds {
            operand,
            shape,
            strides,
            needed,
            len,
        });
    }
    Ok(())
}
