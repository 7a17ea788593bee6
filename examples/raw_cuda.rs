//! An engine with its own CUDA allocator calls attn by device pointer (`attn::interop::cuda`):
//! Q, K and V live in memory attn did not allocate; the output goes back into the engine's own
//! buffer. Checks the result against float64 and, bit for bit, against the same call on attn's
//! own buffers, then times what the copies in and out cost next to the kernel.
//!
//! `cargo run --release --no-default-features --features cuda --example raw_cuda [-- --seq 4096 --batch 2]`

use std::time::Instant;

use attn::inputs::pack;
use attn::interop::cuda::{cudarc::driver::result as cu, export, import, CudaView};
use attn::reference::{
    attention_f64, attention_naive, error_floor, random_vec, seeded_rng, widen, Verdict,
};
use attn::{bf16, AttnError, ComputeClient, Operand, Output, Problem, Tensor};
use variants::Llama3;

#[allow(dead_code)]
mod variants {
    include!("variants/llama3.rs");
}

/// Memory the engine owns: allocated with the driver, freed on drop.
struct EngineBuffer {
    ptr: u64,
    len: usize,
}

impl EngineBuffer {
    fn upload(data: &[bf16]) -> Self {
        unsafe {
            let ptr = cu::malloc_sync(std::mem::size_of_val(data)).expect("cuMemAlloc");
            cu::memcpy_htod_sync(ptr, data).expect("cuMemcpyHtoD");
            Self {
                ptr,
                len: data.len(),
            }
        }
    }
    fn download(&self) -> Vec<bf16> {
        let mut host = vec![bf16::ZERO; self.len];
        unsafe { cu::memcpy_dtoh_sync(&mut host, self.ptr).expect("cuMemcpyDtoH") };
        host
    }
    /// The engine's description of this buffer as a contiguous `[B, H, N, D]` tensor.
    fn view(&self, shape: [usize; 4]) -> CudaView {
        CudaView {
            ptr: self.ptr,
            shape,
            strides: attn::tensor::contiguous_strides(shape),
            device: 0,
        }
    }
}

impl Drop for EngineBuffer {
    fn drop(&mut self) {
        unsafe { cu::free_sync(self.ptr).ok() };
    }
}

/// One problem in the engine's memory.
struct Call {
    q: EngineBuffer,
    k: EngineBuffer,
    v: EngineBuffer,
    o: EngineBuffer,
    host: [Vec<bf16>; 3],
    q_shape: [usize; 4],
    kv_shape: [usize; 4],
}

impl Call {
    fn random(b: usize, hq: usize, hkv: usize, n: usize) -> Self {
        let (mut rng, seed) = seeded_rng("raw_cuda");
        println!("B {b} Hq/Hkv {hq}/{hkv} N {n} D 128 bf16 causal (seed {seed})");
        let (q_shape, kv_shape) = ([b, hq, n, 128], [b, hkv, n, 128]);
        let host: [Vec<bf16>; 3] = [
            random_vec(&mut rng, q_shape.iter().product()),
            random_vec(&mut rng, kv_shape.iter().product()),
            random_vec(&mut rng, kv_shape.iter().product()),
        ];
        Self {
            q: EngineBuffer::upload(&host[0]),
            k: EngineBuffer::upload(&host[1]),
            v: EngineBuffer::upload(&host[2]),
            o: EngineBuffer::upload(&vec![bf16::NAN; host[0].len()]),
            host,
            q_shape,
            kv_shape,
        }
    }

    /// The engine's call: import by pointer, run, export into the engine's O.
    fn run(&self, client: &ComputeClient, out: &Output<bf16>) -> Result<(), AttnError> {
        // SAFETY: the buffers hold these shapes, are written (synchronous uploads) and outlive
        // the calls.
        unsafe {
            let q = import::<bf16>(client, &self.q.view(self.q_shape), Operand::Q)?;
            let k = import::<bf16>(client, &self.k.view(self.kv_shape), Operand::K)?;
            let v = import::<bf16>(client, &self.v.view(self.kv_shape), Operand::V)?;
            Llama3::forward_into(client, &q, &k, &v, out)?;
            export(client, &out.o, self.o.ptr, 0)
        }
    }
}

fn main() {
    let client = attn::default_client();
    // The engine's thread works in the device's primary context, as cubecl does.
    unsafe {
        cu::init().expect("cuInit");
        let ctx = cu::primary_ctx::retain(cu::device::get(0).expect("a CUDA device")).unwrap();
        cu::ctx::set_current(ctx).unwrap();
    }
    let passed = check(&client, Call::random(2, 8, 2, 333));
    let (mut b, mut n) = (2, 4096);
    let args: Vec<String> = std::env::args().collect();
    for pair in args.windows(2) {
        match pair[0].as_str() {
            "--seq" => n = pair[1].parse().expect("a length"),
            "--batch" => b = pair[1].parse().expect("a batch"),
            _ => {}
        }
    }
    let timed = time(&client, Call::random(b, 32, 8, n));
    match passed.and_then(|ok| timed.map(|()| ok)) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// The engine's O against float64, and against the same call on attn's own buffers.
fn check(client: &ComputeClient, call: Call) -> Result<bool, AttnError> {
    let out = Output::empty(client, call.q_shape);
    call.run(client, &out)?;
    let by_pointer = call.o.download();

    let [qh, kh, vh] = &call.host;
    let q = Tensor::from_slice(client, qh, call.q_shape)?;
    let k = Tensor::from_slice(client, kh, call.kv_shape)?;
    let v = Tensor::from_slice(client, vh, call.kv_shape)?;
    let direct = Llama3::forward(client, &q, &k, &v)?.o.to_vec(client);
    let identical = by_pointer
        .iter()
        .zip(&direct)
        .all(|(a, b)| a.to_bits() == b.to_bits());

    let none = attn::Inputs::default();
    let problem = Problem::new(&Llama3::SPEC, &q, &k, &v)?;
    let packed = pack(&Llama3::SPEC, &problem, &none)?;
    let (qw, kw, vw) = (widen(qh), widen(kh), widen(vh));
    let reference = attention_f64::<Llama3>(&problem, &packed, &none, &qw, &kw, &vw);
    let naive = attention_naive::<Llama3>(&problem, &packed, &none, &qw, &kw, &vw);
    let verdict = Verdict::new(
        &widen(&by_pointer),
        &reference.o,
        &naive,
        error_floor::<bf16>(),
    );
    println!(
        "  by pointer: max |O − float64| = {:.3e} (bound {:.3e}); identical to attn's own buffers: {identical}",
        verdict.kernel_error, verdict.bound
    );
    let passed = verdict.passed() && identical;
    println!("  {}", if passed { "PASS" } else { "FAIL" });
    Ok(passed)
}

/// The whole by-pointer call against the kernel alone on tensors already in attn's buffers.
fn time(client: &ComputeClient, call: Call) -> Result<(), AttnError> {
    const ITERS: usize = 20;
    let out = Output::empty(client, call.q_shape);
    call.run(client, &out)?; // compile, tune
    let [qh, kh, vh] = &call.host;
    let q = Tensor::from_slice(client, qh, call.q_shape)?;
    let k = Tensor::from_slice(client, kh, call.kv_shape)?;
    let v = Tensor::from_slice(client, vh, call.kv_shape)?;
    let median = |f: &mut dyn FnMut() -> Result<(), AttnError>| -> Result<f64, AttnError> {
        let mut times = Vec::with_capacity(ITERS);
        for _ in 0..ITERS {
            let start = Instant::now();
            f()?;
            attn::sync(client)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[ITERS / 2])
    };
    let kernel = median(&mut || Llama3::forward_into(client, &q, &k, &v, &out))?;
    let whole = median(&mut || call.run(client, &out))?;
    let bytes = 2 * (qh.len() + kh.len() + vh.len() + qh.len());
    println!(
        "  kernel alone {kernel:.3} ms; by pointer (3 copies in, 1 out: {:.1} MB) {whole:.3} ms; the copies cost {:.3} ms ({:.0} % of the kernel, {:.0} GB/s)",
        bytes as f64 / 1e6,
        whole - kernel,
        100.0 * (whole - kernel) / kernel,
        2.0 * bytes as f64 / ((whole - kernel) * 1e-3) / 1e9
    );
    Ok(())
}
