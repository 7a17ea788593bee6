#!/usr/bin/env python3
"""Decode comparison: attn's decode kernel against PyTorch's SDPA (flash, cuDNN) and
FlexAttention on the same data, with the device's copy bandwidth measured in the same run.

`bench --decode --out DIR` writes one folder per case (listed in DIR/cases.txt):

    meta.json   shape (batch, heads_q, heads_kv, keys, queries, head_dim), page_size and the
                block table for paged cases, scale, our timings (default plan and a sweep)
    q.bin       bf16 [batch, heads_q, queries, head_dim]
    o.bin       bf16 [batch, heads_q, queries, head_dim]   (ours, default plan)
    lse.bin     f32  [batch, heads_q, queries]             (ours)

K and V are not written: both sides compute them from the element index of the logical
[batch, heads_kv, keys, head_dim] cache (`pattern`, the same integer hash as the Rust side), so
multi-gigabyte caches never cross the disk. For an fp8 case (`fp8_scale` in meta.json) the
script rounds them to e4m3 as the cache stores them (`x / scale` in PyTorch's float8_e4m3fn, the
scale a power of two), and the reference and the anchors (16-bit, on the same values) read
those; its bandwidth counts one byte per element. The anchors read that logical cache contiguously; for
paged cases ours reads the shuffled pages.

For each case the script checks our O and LSE against float64 (computed on the GPU), measures the
flash back end's error against the same reference (the error budget: ours <= 2 x flash + 1e-2),
times each anchor with CUDA events (median of --iters after --warmup calls) and reports time and
the achieved bandwidth of reading K and V (B x Hkv x N x 2 x D x 2 bytes / time, N the keys a
sequence's queries see: the window's under a sliding window) against the copy
bandwidth (read + write bytes of a 4 GiB device-to-device copy / time).

    python3 bench/decode.py --dir DIR [--iters 20] [--commit SHA] [--json FILE] [--md FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

M32 = 0xFFFFFFFF


def mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for 0 <= a < 2^32 in int64 without overflow."""
    lo = (a & 0xFFFF) * c
    hi = (((a >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & M32


def pattern(count: int, salt: int, device) -> torch.Tensor:
    """The Rust side's `pattern(i, salt)` for i in 0..count, as bf16."""
    out = torch.empty(count, dtype=torch.bfloat16, device=device)
    chunk = 1 << 28
    for start in range(0, count, chunk):
        i = torch.arange(start, min(count, start + chunk), dtype=torch.int64, device=device)
        h = mul32(i & M32, 0x9E3779B1) ^ mul32(i >> 32, 0x85EBCA77) ^ ((salt * 0xC2B2AE3D) & M32)
        h = h ^ (h >> 15)
        h = mul32(h, 0x2C1B3C6D)
        h = h ^ (h >> 12)
        unit = (h >> 8).to(torch.float32) / 16777216.0
        out[start:start + i.numel()] = (unit * 2.0 - 1.0).to(torch.bfloat16)
        del i, h, unit
    return out


def load(path: Path, dtype: str, shape) -> torch.Tensor:
    arr = np.fromfile(path, dtype=np.dtype(dtype))
    assert arr.size == math.prod(shape), f"{path}: {arr.size} elements, expected {shape}"
    t = torch.from_numpy(arr.reshape(shape))
    if dtype == "<i2":
        t = t.view(torch.bfloat16)
    return t.cuda()


def timed(fn, iters: int, warmup: int) -> float:
    """Median GPU time of one call in ms: calls queued back to back, each between two events,
    synchronised once (as `compare.py` and our side time them)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median([s.elapsed_time(e) for s, e in zip(starts, ends)])


def copy_bandwidth(iters: int) -> float:
    """TB/s of a device-to-device copy, counting bytes read plus bytes written."""
    n = 4 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), iters, 3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / (ms * 1e-3) / 1e12


@torch.no_grad()
def reference(q, k, v, scale, queries, window=None):
    """Float64 O [B, Hq, nq, D] and LSE [B, Hq, nq]; the queries are the last positions, each
    seeing the keys up to its own and, under a sliding window of `window` (left) keys, no further
    back than that."""
    b, hq, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    o = torch.empty((b, hq, nq, d), dtype=torch.float64, device=q.device)
    lse = torch.empty((b, hq, nq), dtype=torch.float64, device=q.device)
    for bi in range(b):
        k64 = k[bi].double()  # [Hkv, N, D]
        v64 = v[bi].double()
        q64 = q[bi].double().view(hkv, g * nq, d)
        s = torch.matmul(q64, k64.transpose(1, 2)) * scale  # [Hkv, g*nq, N]
        t = torch.arange(g * nq, device=q.device) % nq
        pos = n - nq + t
        keys = torch.arange(n, device=q.device).view(1, -1)
        mask = keys > pos.view(-1, 1)
        if window is not None:
            mask |= keys < (pos - window).view(-1, 1)
        s.masked_fill_(mask.unsqueeze(0), float("-inf"))
        m = s.amax(-1, keepdim=True)
        p = (s - m).exp()
        l = p.sum(-1, keepdim=True)
        o[bi] = (torch.matmul(p, v64) / l).view(hq, nq, d)
        lse[bi] = (m + l.log()).view(hq, nq)
        del k64, v64, s, p
    return o, lse


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)

    copy_tbs = copy_bandwidth(args.iters)
    print(f"device copy bandwidth (read + write): {copy_tbs:.2f} TB/s", flush=True)
    rows = []
    all_ok = True
    for name in (args.dir / "cases.txt").read_text().split():
        meta = json.loads((args.dir / name / "meta.json").read_text())
        b, hq, hkv, n, nq, d = (meta[x] for x in ("batch", "heads_q", "heads_kv", "keys", "queries", "head_dim"))
        scale = meta["scale"]
        window = meta.get("window_left")
        keys_read = meta.get("keys_read", n)
        k = pattern(b * hkv * n * d, 1, "cuda").view(b, hkv, n, d)
        v = pattern(b * hkv * n * d, 2, "cuda").view(b, hkv, n, d)
        fp8_scale = meta.get("fp8_scale")
        exact_kv = None
        if fp8_scale is not None:
            def stored(x):
                return ((x.float() / fp8_scale).to(torch.float8_e4m3fn).float() * fp8_scale).to(torch.bfloat16)
            exact_kv = (k, v)
            k, v = stored(k), stored(v)
        q = load(args.dir / name / "q.bin", "<i2", (b, hq, nq, d))
        o = load(args.dir / name / "o.bin", "<i2", (b, hq, nq, d))
        lse = load(args.dir / name / "lse.bin", "<f4", (b, hq, nq))
        ref_o, ref_lse = reference(q, k, v, scale, nq, window)
        err_o = (o.double() - ref_o).abs().max().item()
        # An fp8 case's error against float64 on the values before rounding to e4m3: what the
        # format costs (the check above is the kernel's own error, on the values it stores).
        err_o_unrounded = None
        if exact_kv is not None:
            exact_o, _ = reference(q, exact_kv[0], exact_kv[1], scale, nq, window)
            err_o_unrounded = (o.double() - exact_o).abs().max().item()
            del exact_kv, exact_o
        err_lse = (lse.double() - ref_lse).abs().max().item()
        nan = bool(torch.isnan(o).any().item())
        # What the call must read: each sequence's visible keys (the window's, under one).
        bytes_kv = b * hkv * keys_read * 2 * d * (1 if fp8_scale is not None else 2)
        row = {"case": name, "batch": b, "keys": n, "queries": nq, "page_size": meta["page_size"],
               "fp8": fp8_scale is not None,
               "window_left": window, "keys_read": keys_read,
               "ours_ms": meta["default_ms"], "ours_plan": meta["default_plan"],
               "best_ms": meta["best_ms"], "best_plan": meta["best_plan"],
               "tuned_ms": meta.get("tuned_ms"), "tuning_s": meta.get("tuning_s"),
               "err_o": err_o, "err_lse": err_lse, "err_o_unrounded": err_o_unrounded}
        # Bottom-right causal for several query tokens (one token sees every key: no mask), and
        # the sliding window where the case has one.
        causal_mask = None
        if nq > 1 or window is not None:
            keys = torch.arange(n, device="cuda").view(1, -1)
            pos = (n - nq + torch.arange(nq, device="cuda")).view(-1, 1)
            causal_mask = keys <= pos
            if window is not None:
                causal_mask &= keys >= pos - window
        anchors = {}

        def sdpa(backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask, scale=scale, enable_gqa=True)

        for label, backend in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                out = sdpa(backend)
                anchors[label] = {"ms": timed(lambda: sdpa(backend), args.iters, args.warmup),
                                  "err_o": (out.double() - ref_o).abs().max().item()}
            except Exception as e:  # an anchor that cannot run this case is reported, not fatal
                anchors[label] = {"ms": None, "error": str(e).splitlines()[0][:160]}
        try:
            block_mask = None
            if nq > 1 or window is not None:
                left = n if window is None else window

                def mask_mod(bb, h, qi, ki):
                    return (ki <= qi + (n - nq)) & (ki >= qi + (n - nq) - left)
                block_mask = create_block_mask(mask_mod, None, None, nq, n, device="cuda")
            run_flex = lambda: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
            out = run_flex()
            anchors["flex"] = {"ms": timed(run_flex, args.iters, args.warmup),
                               "err_o": (out.double() - ref_o).abs().max().item()}
        except Exception as e:
            traceback.print_exc()
            anchors["flex"] = {"ms": None, "error": str(e).splitlines()[0][:160]}
        baseline = next((anchors[a]["err_o"] for a in ("fa2", "cudnn", "flex") if anchors[a].get("ms")), None)
        ok = not nan and baseline is not None and err_o <= 2 * baseline + 1e-2 and err_lse <= 1e-2
        all_ok &= ok
        row.update({"anchors": anchors, "baseline_err_o": baseline, "ok": ok,
                    "ours_tbs": bytes_kv / (row["ours_ms"] * 1e-3) / 1e12,
                    "best_tbs": bytes_kv / (row["best_ms"] * 1e-3) / 1e12,
                    "tuned_tbs": bytes_kv / (row["tuned_ms"] * 1e-3) / 1e12 if row["tuned_ms"] else None})
        for a in anchors.values():
            if a.get("ms"):
                a["tbs"] = bytes_kv / (a["ms"] * 1e-3) / 1e12
        rows.append(row)
        print(json.dumps(row), flush=True)
        del k, v, q, o, ref_o, ref_lse
        torch.cuda.empty_cache()

    def cell(a):
        return "n/a" if not a.get("ms") else f"{a['ms']:.3f} ms · {a['tbs']:.2f}"

    lines = [f"Device copy bandwidth (read + write, same run): {copy_tbs:.2f} TB/s. Cells: time · TB/s of K+V read.",
             "",
             "| case (B × keys, Nq, cache) | ours (default plan) | ours (tuned `decode`) | % of copy (tuned) | ours (best of sweep) | FA2 | cuDNN | Flex | × cuDNN (tuned) | × Flex (tuned) | err O ours / baseline | ok |",
             "|---|---|---|---:|---|---|---|---|---:|---:|---|:---:|"]
    for r in rows:
        an = r["anchors"]
        cache = "contiguous" if r["page_size"] is None else f"paged {r['page_size']}"
        mine = r["tuned_ms"] or r["ours_ms"]
        mine_tbs = r["tuned_tbs"] or r["ours_tbs"]
        ratio = lambda x: "—" if not an[x].get("ms") else f"{an[x]['ms'] / mine:.2f}"
        tuned = "—" if not r["tuned_ms"] else f"{r['tuned_ms']:.3f} ms · {r['tuned_tbs']:.2f}"
        if r.get("window_left") is not None:
            cache += f", window {r['window_left'] + 1}"
        if r.get("fp8"):
            cache += ", fp8 (anchors: bf16 on its values)"
        lines.append(
            f"| {r['batch']} × {r['keys']}, {r['queries']}, {cache} | {r['ours_ms']:.3f} ms · {r['ours_tbs']:.2f} ({r['ours_plan']}) "
            f"| {tuned} | {100 * mine_tbs / copy_tbs:.0f} % | {r['best_ms']:.3f} ms · {r['best_tbs']:.2f} ({r['best_plan']}) "
            f"| {cell(an['fa2'])} | {cell(an['cudnn'])} | {cell(an['flex'])} | {ratio('cudnn')} | {ratio('flex')} "
            f"| {r['err_o']:.2e} / {r['baseline_err_o'] if r['baseline_err_o'] is None else format(r['baseline_err_o'], '.2e')}"
            f"{'' if r.get('err_o_unrounded') is None else format(r['err_o_unrounded'], '.1e').join([' (', ' before e4m3)'])} | {'yes' if r['ok'] else 'NO'} |")
    table = "\n".join(lines)
    print(table)
    if args.md:
        args.md.write_text(table + "\n")
    if args.json:
        history = json.loads(args.json.read_text()) if args.json.exists() else {"runs": []}
        history["runs"].append({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                "commit": args.commit, "device": torch.cuda.get_device_name(),
                                "copy_tbs": copy_tbs, "cases": rows})
        args.json.write_text(json.dumps(history, indent=1) + "\n")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
