//! `bench --decode-mixed`: a serving engine's mixed step, Llama-3 shaped (bf16, 32/8 heads,
//! d 128): 60 sequences decoding one token each and 4 sequences each bringing a 512-token prompt
//! chunk, every sequence with 8192 cached tokens (a chunk's own tokens are its sequence's last
//! 512) in pages of 64. Times the step as one ragged call (`decode_ragged_into`: the chunks'
//! rows and the decode rows in one launch) against the two calls an engine makes without ragged
//! batches (a decode call for the 60, a chunked-prefill call for the 4), and checks that both give
//! the same rows.

use attn::reference::{random_vec, seeded_rng};
use attn::{bf16, ComputeClient, Inputs, KvCache, Lse, Output, Tensor};

use crate::decode::{pattern, Llama3Decode, D, HEADS_KV, HEADS_Q};

const DECODING: usize = 60;
const CHUNKS: usize = 4;
const CHUNK: usize = 512;
const CACHED: usize = 8192;
const PAGE: usize = 64;

/// Runs the measurement; false if it failed or the two ways disagree.
pub fn run_decode_mixed(client: &ComputeClient, iters: usize) -> bool {
    match measure(client, iters) {
        Ok(ok) => ok,
        Err(e) => {
            println!("mixed decode step: failed: {e}");
            false
        }
    }
}

/// A paged cache of the sequences `first..first + count` of the pattern, each `CACHED` tokens in
/// pages of `PAGE` laid out in sequence order.
fn cache(
    client: &ComputeClient,
    first: usize,
    count: usize,
) -> Result<KvCache<bf16>, attn::AttnError> {
    let per_seq = CACHED / PAGE;
    let pool = |salt: u32| -> Result<Tensor<bf16>, attn::AttnError> {
        // Page `s · per_seq + j` holds tokens `j · PAGE..` of sequence `s`, head by head.
        let mut data = Vec::with_capacity(count * per_seq * HEADS_KV * PAGE * D);
        for s in first..first + count {
            for j in 0..per_seq {
                for h in 0..HEADS_KV {
                    let row = ((s * HEADS_KV + h) * CACHED + j * PAGE) * D;
                    data.extend((row..row + PAGE * D).map(|i| pattern(i as u64, salt)));
                }
            }
        }
        Tensor::from_slice(client, &data, [count * per_seq, HEADS_KV, PAGE, D])
    };
    let table: Vec<i32> = (0..(count * per_seq) as i32).collect();
    KvCache::from_paged_parts(
        pool(1)?,
        pool(2)?,
        PAGE,
        table,
        per_seq,
        vec![CACHED; count],
    )
}

fn measure(client: &ComputeClient, iters: usize) -> Result<bool, attn::AttnError> {
    let (mut rng, _) = seeded_rng("decode_mixed");
    let all = cache(client, 0, DECODING + CHUNKS)?;
    let decoding = cache(client, 0, DECODING)?;
    let chunked = cache(client, DECODING, CHUNKS)?;
    // The step's queries as a ragged batch `[1, Hq, total, D]`, and as the two calls take them.
    let mut offsets = vec![0usize];
    for b in 0..DECODING + CHUNKS {
        let n = if b < DECODING { 1 } else { CHUNK };
        offsets.push(offsets[b] + n);
    }
    let total = offsets[DECODING + CHUNKS];
    let ragged_q: Vec<bf16> = random_vec(&mut rng, HEADS_Q * total * D);
    let rows = |b: usize, h: usize| {
        let at = (h * total + offsets[b]) * D;
        &ragged_q[at..at + (offsets[b + 1] - offsets[b]) * D]
    };
    let gather = |seqs: std::ops::Range<usize>| -> Vec<bf16> {
        let mut q = Vec::new();
        for b in seqs {
            for h in 0..HEADS_Q {
                q.extend_from_slice(rows(b, h));
            }
        }
        q
    };
    let q_all = Tensor::from_slice(client, &ragged_q, [1, HEADS_Q, total, D])?;
    let q_dec = Tensor::from_slice(client, &gather(0..DECODING), [DECODING, HEADS_Q, 1, D])?;
    let q_chunk = Tensor::from_slice(
        client,
        &gather(DECODING..DECODING + CHUNKS),
        [CHUNKS, HEADS_Q, CHUNK, D],
    )?;
    let output = |shape: [usize; 4]| Output {
        o: Tensor::<bf16>::empty(client, shape),
        lse: Lse::empty(client, [shape[0], shape[1], shape[2]]),
    };
    let (out_all, out_dec, out_chunk) = (
        output([1, HEADS_Q, total, D]),
        output([DECODING, HEADS_Q, 1, D]),
        output([CHUNKS, HEADS_Q, CHUNK, D]),
    );
    let none = Inputs::default();
    let one_call = || {
        attn::decode_ragged_into::<Llama3Decode>(client, &q_all, &offsets, &all, &none, &out_all)
    };
    let decode_call =
        || attn::decode_into::<Llama3Decode>(client, &q_dec, &decoding, &none, &out_dec);
    let chunk_call =
        || attn::decode_into::<Llama3Decode>(client, &q_chunk, &chunked, &none, &out_chunk);
    // First calls: compile, and tune each key where the policy says so.
    one_call()?;
    decode_call()?;
    chunk_call()?;
    attn::sync(client)?;
    let median = |mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let ragged_ms = median(super::device_times(client, iters, one_call)?);
    let two_ms = median(super::device_times(client, iters, || {
        decode_call()?;
        chunk_call()
    })?);
    let decode_ms = median(super::device_times(client, iters, decode_call)?);
    let chunk_ms = median(super::device_times(client, iters, chunk_call)?);
    // The same rows both ways (other plans, so not the same bits).
    let (all_o, dec_o, chunk_o) = (
        out_all.o.to_vec(client),
        out_dec.o.to_vec(client),
        out_chunk.o.to_vec(client),
    );
    let mut worst = 0.0f32;
    for b in 0..DECODING + CHUNKS {
        let n = offsets[b + 1] - offsets[b];
        for h in 0..HEADS_Q {
            let at = (h * total + offsets[b]) * D;
            let (other, from) = if b < DECODING {
                (&dec_o, (b * HEADS_Q + h) * D)
            } else {
                (&chunk_o, ((b - DECODING) * HEADS_Q + h) * CHUNK * D)
            };
            for i in 0..n * D {
                worst = worst.max((all_o[at + i].to_f32() - other[from + i].to_f32()).abs());
            }
        }
    }
    let same = worst <= 2e-2;
    println!(
        "mixed step ({DECODING} × 1 token + {CHUNKS} × {CHUNK}-token chunks, {CACHED} cached, pages of {PAGE}): \
         one ragged call {ragged_ms:.4} ms; two calls {two_ms:.4} ms (decode {decode_ms:.4} + chunks {chunk_ms:.4}); \
         ×{:.2}; max |O one − two| {worst:.2e}: {}",
        two_ms / ragged_ms,
        if same { "ok" } else { "FAILED" }
    );
    Ok(same)
}
