#!/usr/bin/env python3
"""Compare attn prefill benchmark dumps against PyTorch attention back ends.

The Rust benchmark writes one folder per case under an output directory:

    OUT/cases.txt            case folder names, one per line, in run order
    OUT/<case>/meta.json     shape, mask, scale, timings (median_ms, times_ms, ...)
    OUT/<case>/q.bin         bf16, [batch, heads_q,  seq_q, head_dim]
    OUT/<case>/k.bin         bf16, [batch, heads_kv, seq_k, head_dim]
    OUT/<case>/v.bin         bf16, [batch, heads_kv, seq_k, head_dim]
    OUT/<case>/o.bin         bf16, [batch, heads_q,  seq_q, head_dim]  (our output)
    OUT/<case>/lse.bin       f32,  [batch, heads_q,  seq_q]            (our LSE)

Variant cases (meta "mask": "variant") also carry what FlexAttention needs to build the same
computation: "causal", "window_left", "window_right", "documents" (packed offsets), "custom_mask"
(a variant name with a known expression), "softcap", "alibi" ("geometric"), "sinks" (per head),
"custom_score" (a variant name with a known score expression) with its "table" (f32 values),
"value_dim" and "pairs" (visible pairs over all heads and sequences). SDPA cannot express them,
so they are compared with FlexAttention only, and Flex's own output is the error baseline.

For every case this script

  1. checks our O and LSE against a float64 reference computed on the GPU
     (chunked so a score block never exceeds ~2 GiB of float64), and measures
     the error of PyTorch's SDPA flash back end against the same reference;
     a case is ``ok`` when ours has no NaN and
     ``max_abs_err_o <= 2 * flash_max_abs_err_o + 1e-2``;
  2. times SDPA flash ("FA2"), SDPA cuDNN and FlexAttention (torch.compile)
     on the same inputs with CUDA events (warm-up calls, then each timed call
     recorded separately; the median is reported);
  3. reports TFLOP/s (4 * B * Hq * visible_pairs * D / time) and speed ratios
     (anchor_ms / attn_ms, > 1 means attn is faster).

Usage:

    python3 bench/compare.py --dir OUT [--iters 10] [--warmup 3]
        [--commit SHA] [--json bench/results.json] [--md OUT/table.md]
        [--skip-flex]

Outputs a markdown table (printed and written to --md) and appends a run to
the JSON history file (--json, {"runs": [...]}).

Exit status: 0 when all of our outputs pass the correctness check (anchor
failures are only reported), 1 when any case fails it, 2 on usage errors or
when no CUDA device is available.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

# Largest float64 score block materialised by the reference at once.
REF_CHUNK_BYTES = 2 << 30
ABS_FLOOR = 1e-2

ANCHORS = ("fa2", "cudnn", "flex")
ANCHOR_LABELS = {"fa2": "FA2", "cudnn": "cuDNN", "flex": "Flex"}

# meta "dtype" -> (numpy dtype of the raw file, torch dtype to view it as).
# bf16 is read as int16 (bit-identical to uint16) because torch's uint16
# support is limited; the bits are then reinterpreted as bfloat16.
RAW_DTYPES = {
    "bf16": ("<i2", torch.bfloat16),
    "bfloat16": ("<i2", torch.bfloat16),
    "f16": ("<f2", torch.float16),
    "fp16": ("<f2", torch.float16),
    "float16": ("<f2", torch.float16),
}


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Check attn benchmark outputs and compare against PyTorch attention back ends.")
    p.add_argument("--dir", required=True, type=Path,
                   help="benchmark output directory (holds cases.txt and one folder per case)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per anchor (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls per anchor (default 3)")
    p.add_argument("--commit", default=None, help="commit id recorded with the run")
    p.add_argument("--json", type=Path, default=Path("bench/results.json"),
                   help="JSON history file to append the run to (default bench/results.json)")
    p.add_argument("--md", type=Path, default=None,
                   help="markdown table output (default DIR/table.md)")
    p.add_argument("--skip-flex", action="store_true", help="do not run the FlexAttention anchor")
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error("--iters must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.md is None:
        args.md = args.dir / "table.md"
    return args


def log(msg: str = "") -> None:
    print(msg, flush=True)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------
# Case description and loading
# --------------------------------------------------------------------------

class Case:
    """Shape/mask parameters of one benchmark case, derived from meta.json."""

    def __init__(self, name: str, meta: dict):
        self.name = name
        self.meta = meta
        self.batch = int(meta["batch"])
        self.hq = int(meta["heads_q"])
        self.hkv = int(meta["heads_kv"])
        self.sq = int(meta["seq_q"])
        self.sk = int(meta["seq_k"])
        self.d = int(meta["head_dim"])
        if self.hkv <= 0 or self.hq % self.hkv != 0:
            raise ValueError(f"heads_q={self.hq} is not a multiple of heads_kv={self.hkv}")
        self.group = self.hq // self.hkv
        self.gqa = self.hq != self.hkv
        self.dtype = str(meta.get("dtype", "bf16")).lower()
        if self.dtype not in RAW_DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        self.causal = str(meta.get("mask", "none")).lower() == "causal"
        align = str(meta.get("causal_alignment", "bottom_right")).lower()
        self.top_left = "top" in align
        # Query i sees key j iff j <= i + offset.
        self.offset = 0 if self.top_left else self.sk - self.sq
        scale = meta.get("scale")
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(self.d)
        self.dv = int(meta.get("value_dim", self.d))
        self.variant = str(meta.get("mask", "none")).lower() == "variant"
        if self.variant:
            self.causal = bool(meta.get("causal"))
        self.window_left = meta.get("window_left")
        self.window_right = meta.get("window_right")
        self.documents = meta.get("documents")
        self.custom_mask = meta.get("custom_mask")
        self.softcap = meta.get("softcap")
        self.alibi = meta.get("alibi")
        self.sinks = meta.get("sinks")
        self.custom_score = meta.get("custom_score")
        self.table = meta.get("table")
        self.pairs = meta.get("pairs")
        self.mask_terms = meta.get("mask_terms", "causal" if self.causal else "none")

    @property
    def ours_ms(self) -> Optional[float]:
        ms = self.meta.get("median_ms")
        if ms is None and self.meta.get("times_ms"):
            ms = statistics.median(self.meta["times_ms"])
        return float(ms) if ms is not None else None

    @property
    def shape_label(self) -> str:
        mask = self.mask_terms if self.variant else ("causal" if self.causal else "none")
        extras = []
        if self.softcap is not None:
            extras.append(f"softcap {self.softcap:g}")
        if self.alibi:
            extras.append("alibi")
        if self.sinks is not None:
            extras.append("sinks")
        if self.documents is not None:
            extras.append(f"{len(self.documents) - 1} docs")
        if self.dtype not in ("bf16", "bfloat16"):
            extras.append(self.dtype)
        mask = " ".join([mask] + extras)
        seq = f"{self.sq}" if self.sq == self.sk else f"{self.sq}x{self.sk}"
        d = f"{self.d}" if self.dv == self.d else f"{self.d}/{self.dv}"
        return f"({self.batch}, {self.hq}/{self.hkv}, {seq}, {d}, {mask})"


def read_case_list(out_dir: Path) -> list[str]:
    listing = out_dir / "cases.txt"
    if listing.is_file():
        names = []
        for line in listing.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                names.append(line)
        return names
    log(f"warning: {listing} not found; using every sub-folder with a meta.json")
    return sorted(p.parent.name for p in out_dir.glob("*/meta.json"))


def load_raw(path: Path, np_dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.fromfile(path, dtype=np.dtype(np_dtype))
    expected = math.prod(shape)
    if arr.size != expected:
        raise ValueError(f"{path.name}: {arr.size} elements, expected {expected} for shape {list(shape)}")
    return arr.reshape(shape)


def load_half(path: Path, case: Case, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    np_dtype, torch_dtype = RAW_DTYPES[case.dtype]
    arr = load_raw(path, np_dtype, shape)
    t = torch.from_numpy(arr)
    if t.dtype != torch_dtype:
        t = t.view(torch_dtype)  # reinterpret the int16 bits as bfloat16
    return t.to(device)


def load_tensors(case_dir: Path, case: Case, device: torch.device) -> dict[str, torch.Tensor]:
    b, hq, hkv, sq, sk, d = case.batch, case.hq, case.hkv, case.sq, case.sk, case.d
    lse = torch.from_numpy(load_raw(case_dir / "lse.bin", "<f4", (b, hq, sq))).to(device)
    dv = case.dv
    return {
        "q": load_half(case_dir / "q.bin", case, (b, hq, sq, d), device),
        "k": load_half(case_dir / "k.bin", case, (b, hkv, sk, d), device),
        "v": load_half(case_dir / "v.bin", case, (b, hkv, sk, dv), device),
        "o": load_half(case_dir / "o.bin", case, (b, hq, sq, dv), device),
        "lse": lse,
    }


# --------------------------------------------------------------------------
# Variant semantics: the same mask and score modification for Flex and the reference
# --------------------------------------------------------------------------

def alibi_slopes(heads: int) -> list[float]:
    """The standard ALiBi slopes (the same definition as attn's)."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    closest = 1 << (max(heads, 1).bit_length() - 1)
    slopes = power_of_two(closest)
    if closest < heads:
        slopes += power_of_two(2 * closest)[0::2][: heads - closest]
    return slopes


CUSTOM_MASKS = {
    # |b, h, q, k| q >= k && (q - k) < 256 || k < 4
    "StreamMask": lambda q, k: ((q >= k) & (q - k < 256)) | (k < 4),
}


def t5_bucket(distance: torch.Tensor) -> torch.Tensor:
    """T5's bucket of a distance as the bench's `T5Bias` computes it (f32 logarithm, truncated):
    exact below 16, log-spaced up to 128, the table's last bucket beyond."""
    far = 16 + (torch.log(distance.to(torch.float32) / 16.0) * 7.69).to(torch.int64)
    return torch.where(distance < 16, distance, far).clamp(0, 31)


CUSTOM_SCORES = {
    # |s, b, h, q, k| s + rel[h][bucket(q - k)], rel: [f32; heads, 32], read as one flat index
    # (FlexAttention differentiates a captured tensor only through a single indexing operation).
    "T5Bias": lambda score, h, q, k, table: score + table[h * 32 + t5_bucket(q - k)],
}


def case_table(case: Case, device: torch.device) -> Optional[torch.Tensor]:
    """The case's learnable table (f32, flat, row-major as attn holds it), or None."""
    if case.table is None:
        return None
    return torch.tensor(case.table, device=device, dtype=torch.float32)


def variant_mods(case: Case, device: torch.device, table: Optional[torch.Tensor] = None):
    """(mask_mod or None, score_mod or None, sinks tensor or None) with attn's semantics; a
    custom score reads `table` (default: the case's, as a constant)."""
    offset = case.offset
    doc = None
    if case.documents is not None:
        offs = torch.tensor(case.documents, device=device, dtype=torch.int64)
        doc = torch.searchsorted(offs[1:], torch.arange(case.sq, device=device), right=True)
    terms = []
    if case.causal:
        terms.append(lambda q, k: k <= q + offset)
    if case.window_left is not None:
        left = int(case.window_left)
        terms.append(lambda q, k: k >= q + offset - left)
    if case.window_right is not None:
        right = int(case.window_right)
        terms.append(lambda q, k: k <= q + offset + right)
    if doc is not None:
        terms.append(lambda q, k: doc[q] == doc[k])
    if case.custom_mask is not None:
        terms.append(CUSTOM_MASKS[case.custom_mask])
    mask_mod = None
    if terms:
        def mask_mod(b, h, q_idx, kv_idx):
            m = terms[0](q_idx, kv_idx)
            for t in terms[1:]:
                m = m & t(q_idx, kv_idx)
            return m
    score_mod = None
    custom = CUSTOM_SCORES[case.custom_score] if case.custom_score is not None else None
    if table is None:
        table = case_table(case, device)
    if case.softcap is not None or case.alibi or custom is not None:
        cap = float(case.softcap) if case.softcap is not None else None
        slopes = torch.tensor(alibi_slopes(case.hq), device=device, dtype=torch.float32) \
            if case.alibi else None

        # attn's order: softcap, ALiBi, then the variant's own expression.
        def score_mod(score, b, h, q_idx, kv_idx):
            if cap is not None:
                score = cap * torch.tanh(score / cap)
            if slopes is not None:
                score = score - slopes.to(score.dtype)[h] * (q_idx + offset - kv_idx).abs()
            if custom is not None:
                score = custom(score, h, q_idx, kv_idx, table.to(score.dtype))
            return score
    sinks = None
    if case.sinks is not None:
        sinks = torch.tensor(case.sinks, device=device, dtype=torch.float32)
    return mask_mod, score_mod, sinks


# --------------------------------------------------------------------------
# FLOP accounting
# --------------------------------------------------------------------------

def visible_pairs(case: Case) -> int:
    """Number of (query, key) pairs that take part in the attention (per batch entry and head,
    except for variant cases, whose meta counts every head and sequence)."""
    if case.pairs is not None:
        return int(case.pairs)
    if not case.causal:
        return case.sq * case.sk
    i = np.arange(case.sq, dtype=np.int64)
    return int(np.clip(i + case.offset + 1, 0, case.sk).sum())


def tflops(case: Case, ms: Optional[float]) -> Optional[float]:
    if ms is None or ms <= 0:
        return None
    if case.pairs is not None:
        flops = 2 * int(case.pairs) * (case.d + case.dv)
    else:
        flops = 4 * case.batch * case.hq * visible_pairs(case) * case.d
    return flops / (ms * 1e-3) / 1e12


def speed_ratio(anchor_ms: Optional[float], ours_ms: Optional[float]) -> Optional[float]:
    if anchor_ms is None or not ours_ms:
        return None
    return anchor_ms / ours_ms


# --------------------------------------------------------------------------
# Float64 reference and error measurement
# --------------------------------------------------------------------------

def plan_chunks(hq: int, sq: int, sk: int) -> tuple[int, int]:
    """(query heads per block, query rows per block) with blocks <= REF_CHUNK_BYTES of f64 scores."""
    budget = max(1, REF_CHUNK_BYTES // 8)
    rows = max(1, budget // max(1, sk))
    if rows >= sq:
        return max(1, min(hq, rows // sq)), sq
    return 1, rows


def reference_chunk(q64: torch.Tensor, k64: torch.Tensor, v64: torch.Tensor,
                    i0: int, case: Case, h0: int = 0, mods=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 O [h, rows, Dv] and LSE [h, rows] for query rows i0.. of heads h0.. .

    Fully masked rows get O = 0 and LSE = -inf (with a sink: O = 0, LSE = sink).
    """
    if mods is not None:
        return reference_chunk_variant(q64, k64, v64, i0, case, h0, mods)
    nh, rows, d = q64.shape
    sk = k64.shape[1]
    if case.causal:
        # The last row of the block (i0 + rows - 1) sees keys j <= i0 + rows - 1 + offset.
        kmax = min(sk, max(0, i0 + rows + case.offset))
    else:
        kmax = sk
    if kmax == 0:
        o = torch.zeros((nh, rows, d), dtype=torch.float64, device=q64.device)
        lse = torch.full((nh, rows), float("-inf"), dtype=torch.float64, device=q64.device)
        return o, lse

    s = torch.matmul(q64, k64[:, :kmax].transpose(1, 2))
    s.mul_(case.scale)
    if case.causal:
        i = torch.arange(i0, i0 + rows, device=q64.device).unsqueeze(1)
        j = torch.arange(kmax, device=q64.device).unsqueeze(0)
        s.masked_fill_(j > i + case.offset, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked rows
    s.sub_(m).exp_()
    l = s.sum(dim=-1, keepdim=True)
    o = torch.matmul(s, v64[:, :kmax])
    del s
    o = torch.where(l > 0, o / l, torch.zeros_like(o))
    lse = (torch.log(l) + m).squeeze(-1)  # log(0) = -inf for fully masked rows
    return o, lse


def reference_chunk_variant(q64, k64, v64, i0, case, h0, mods):
    mask_mod, score_mod, sinks = mods
    nh, rows, _ = q64.shape
    sk = k64.shape[1]
    kmax = min(sk, max(0, i0 + rows + case.offset)) if case.causal else sk
    dev = q64.device
    hs = torch.arange(h0, h0 + nh, device=dev).view(-1, 1, 1)
    qi = torch.arange(i0, i0 + rows, device=dev).view(1, -1, 1)
    kj = torch.arange(kmax, device=dev).view(1, 1, -1)
    s = torch.matmul(q64, k64[:, :kmax].transpose(1, 2)) * case.scale
    if score_mod is not None:
        s = score_mod(s, 0, hs, qi, kj)
    if mask_mod is not None:
        s = s.masked_fill(~mask_mod(0, hs, qi, kj), float("-inf"))
    m = s.amax(dim=-1, keepdim=True) if kmax > 0 else torch.full((nh, rows, 1), float("-inf"), dtype=torch.float64, device=dev)
    if sinks is not None:
        sink = sinks[h0:h0 + nh].double().view(-1, 1, 1).expand(nh, rows, 1)
        m = torch.maximum(m, sink)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = (s - m).exp()
    l = p.sum(dim=-1, keepdim=True)
    if sinks is not None:
        l = l + (sink - m).exp()
    o = torch.matmul(p, v64[:, :kmax])
    o = torch.where(l > 0, o / l, torch.zeros_like(o))
    lse = (torch.log(l) + m).squeeze(-1)
    return o, lse


@torch.no_grad()
def measure_errors(case: Case, t: dict[str, torch.Tensor],
                   other_o: Optional[torch.Tensor]) -> dict[str, Any]:
    """Max abs errors of our O/LSE (and optionally another O) against float64."""
    q, k, v, o, lse = t["q"], t["k"], t["v"], t["o"], t["lse"]
    dev = q.device
    mods = variant_mods(case, dev) if case.variant else None
    nh, qc = plan_chunks(case.hq, case.sq, case.sk)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    err_o, err_lse, err_other = zero.clone(), zero.clone(), zero.clone()
    mismatch = torch.zeros((), dtype=torch.int64, device=dev)

    for b in range(case.batch):
        for h0 in range(0, case.hq, nh):
            h1 = min(case.hq, h0 + nh)
            kv_idx = torch.arange(h0, h1, device=dev) // case.group
            q64 = q[b, h0:h1].double()
            k64 = k[b].index_select(0, kv_idx).double()
            v64 = v[b].index_select(0, kv_idx).double()
            for i0 in range(0, case.sq, qc):
                i1 = min(case.sq, i0 + qc)
                ref_o, ref_lse = reference_chunk(q64[:, i0:i1], k64, v64, i0, case, h0, mods)

                ours_o = o[b, h0:h1, i0:i1].double()
                err_o = torch.maximum(err_o, (ours_o - ref_o).abs().amax())
                if other_o is not None:
                    theirs = other_o[b, h0:h1, i0:i1].double()
                    err_other = torch.maximum(err_other, (theirs - ref_o).abs().amax())

                ours_lse = lse[b, h0:h1, i0:i1].double()
                finite = torch.isfinite(ref_lse)
                diff = torch.where(finite, (ours_lse - ref_lse).abs(), 0.0)
                err_lse = torch.maximum(err_lse, diff.amax())
                mismatch += (~finite & (ours_lse != float("-inf"))).sum()
            del q64, k64, v64

    return {
        "max_abs_err_o": err_o.item(),
        "max_abs_err_lse": err_lse.item(),
        "other_err_o": err_other.item() if other_o is not None else None,
        "lse_masked_rows_mismatch": int(mismatch.item()),
        "nan_in_o": bool(torch.isnan(o).any().item()),
        "nan_in_lse": bool(torch.isnan(lse).any().item()),
    }


# --------------------------------------------------------------------------
# Anchors (PyTorch back ends) and timing
# --------------------------------------------------------------------------

def time_cuda(fn: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """Per-call GPU times in ms; calls are queued back to back, synchronised once."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def first_line(text: str, limit: int = 300) -> str:
    for line in str(text).splitlines():
        line = line.strip()
        if line:
            return line[:limit]
    return ""


def describe_error(exc: BaseException, caught: list) -> str:
    msg = f"{type(exc).__name__}: {first_line(exc)}"
    # SDPA explains why a back end was rejected through warnings.
    reasons = [first_line(w.message) for w in caught if first_line(w.message)]
    if reasons:
        msg += f" [{reasons[0]}]"
    return msg


def expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.repeat_interleave(group, dim=1) if group > 1 else x


def run_anchor(make_fn: Callable[[bool], Callable[[], torch.Tensor]],
               ctx_factory: Callable[[], contextlib.AbstractContextManager],
               case: Case, warmup: int, iters: int, keep_output: bool
               ) -> tuple[dict[str, Any], Optional[torch.Tensor]]:
    """Run one anchor: native GQA first, then (for GQA cases) once more with K/V expanded."""
    result: dict[str, Any] = {"ms": None, "tflops": None, "error": None, "gqa_expanded": False}
    errors: list[str] = []
    attempts = [False, True] if case.gqa else [False]
    for expanded in attempts:
        caught: list = []
        out = None
        try:
            with warnings.catch_warnings(record=True) as caught, ctx_factory():
                warnings.simplefilter("always")
                fn = make_fn(expanded)
                out = fn()  # surfaces unsupported-shape errors before timing
                torch.cuda.synchronize()
                times = time_cuda(fn, warmup, iters)
        except Exception as exc:  # noqa: BLE001 - any back-end failure is reported, not fatal
            prefix = "expanded K/V: " if expanded else ""
            errors.append(prefix + describe_error(exc, caught or []))
            del out
            fn = None
            gc.collect()
            torch.cuda.empty_cache()
            continue
        result.update(ms=statistics.median(times), error=None, gqa_expanded=expanded)
        result["tflops"] = tflops(case, result["ms"])
        return result, (out if keep_output else None)
    result["error"] = " | ".join(errors)
    return result, None


def sdpa_maker(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> Callable[[bool], Callable[[], torch.Tensor]]:
    def make(expanded: bool) -> Callable[[], torch.Tensor]:
        kk, vv = (expand_kv(k, case.group), expand_kv(v, case.group)) if expanded else (k, v)
        gqa = case.gqa and not expanded
        if case.causal and case.offset != 0:
            # is_causal=True is top-left aligned; use the bottom-right bias instead.
            from torch.nn.attention.bias import causal_lower_right
            bias = causal_lower_right(case.sq, case.sk)
            return lambda: F.scaled_dot_product_attention(
                q, kk, vv, attn_mask=bias, scale=case.scale, enable_gqa=gqa)
        return lambda: F.scaled_dot_product_attention(
            q, kk, vv, is_causal=case.causal, scale=case.scale, enable_gqa=gqa)
    return make


_FLEX_COMPILED = None


def compiled_flex():
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def flex_maker(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               table: Optional[torch.Tensor] = None
               ) -> Callable[[bool], Callable[[], torch.Tensor]]:
    def make(expanded: bool) -> Callable[[], torch.Tensor]:
        import torch._dynamo
        from torch.nn.attention.flex_attention import create_block_mask
        torch._dynamo.reset()  # fresh compile per case; avoids hitting recompile limits
        flex = compiled_flex()
        kk, vv = (expand_kv(k, case.group), expand_kv(v, case.group)) if expanded else (k, v)
        gqa = case.gqa and not expanded
        block_mask = None
        if case.variant:
            mask_mod, score_mod, sinks = variant_mods(case, q.device, table)
            if mask_mod is not None:
                block_mask = create_block_mask(mask_mod, B=None, H=None,
                                               Q_LEN=case.sq, KV_LEN=case.sk, device=q.device)
            if sinks is None:
                return lambda: flex(q, kk, vv, block_mask=block_mask, score_mod=score_mod,
                                    scale=case.scale, enable_gqa=gqa)
            sink = sinks.view(1, -1, 1)

            def with_sinks():
                # The sink joins the denominator: O · e^lse / (e^lse + e^sink).
                out, lse = flex(q, kk, vv, block_mask=block_mask, score_mod=score_mod,
                                scale=case.scale, enable_gqa=gqa, return_lse=True)
                return (out * torch.sigmoid(lse - sink).unsqueeze(-1).to(out.dtype))
            return with_sinks
        if case.causal:
            offset = case.offset

            def causal_mod(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx + offset

            block_mask = create_block_mask(causal_mod, B=None, H=None,
                                           Q_LEN=case.sq, KV_LEN=case.sk, device=q.device)
        return lambda: flex(q, kk, vv, block_mask=block_mask, scale=case.scale, enable_gqa=gqa)
    return make


def sdpa_ctx(backend) -> Callable[[], contextlib.AbstractContextManager]:
    from torch.nn.attention import sdpa_kernel
    return lambda: sdpa_kernel(backend)


def run_anchors(case: Case, t: dict[str, torch.Tensor], args: argparse.Namespace
                ) -> tuple[dict[str, dict], Optional[torch.Tensor], Optional[str]]:
    """Time all anchors; returns results, a bf16 back-end output for the error baseline and its name."""
    from torch.nn.attention import SDPBackend
    q, k, v = t["q"], t["k"], t["v"]
    sdpa = sdpa_maker(case, q, k, v)
    results: dict[str, dict] = {}
    if case.variant:
        why = f"SDPA cannot express {case.shape_label}"
        for key in ("fa2", "cudnn"):
            results[key] = {"ms": None, "tflops": None, "error": why, "gqa_expanded": False}
        results["flex"], flex_out = run_anchor(flex_maker(case, q, k, v), contextlib.nullcontext,
                                               case, args.warmup, args.iters, keep_output=True)
        return results, flex_out, ("flex" if flex_out is not None else None)

    results["fa2"], base_out = run_anchor(sdpa, sdpa_ctx(SDPBackend.FLASH_ATTENTION),
                                          case, args.warmup, args.iters, keep_output=True)
    base_name = "fa2" if base_out is not None else None

    results["cudnn"], cudnn_out = run_anchor(sdpa, sdpa_ctx(SDPBackend.CUDNN_ATTENTION),
                                             case, args.warmup, args.iters,
                                             keep_output=base_out is None)
    if base_out is None and cudnn_out is not None:
        base_out, base_name = cudnn_out, "cudnn"
    del cudnn_out

    if args.skip_flex:
        results["flex"] = {"ms": None, "tflops": None, "error": "skipped (--skip-flex)",
                           "gqa_expanded": False}
    else:
        results["flex"], _ = run_anchor(flex_maker(case, q, k, v), contextlib.nullcontext,
                                        case, args.warmup, args.iters, keep_output=False)

    if base_out is None:
        # Neither flash nor cuDNN ran: use memory-efficient SDPA (untimed) as the error baseline.
        _, base_out = run_anchor(sdpa, sdpa_ctx(SDPBackend.EFFICIENT_ATTENTION),
                                 case, 0, 1, keep_output=True)
        base_name = "efficient" if base_out is not None else None
    return results, base_out, base_name


# --------------------------------------------------------------------------
# Per-case driver
# --------------------------------------------------------------------------

def process_case(out_dir: Path, name: str, args: argparse.Namespace,
                 device: torch.device) -> dict[str, Any]:
    case_dir = out_dir / name
    meta = json.loads((case_dir / "meta.json").read_text())
    case = Case(name, meta)
    record: dict[str, Any] = {key: val for key, val in meta.items() if key != "times_ms"}
    record.setdefault("case", name)
    ours_ms = case.ours_ms
    record["median_ms"] = ours_ms
    record["tflops"] = tflops(case, ours_ms)
    record["pairs"] = visible_pairs(case)

    t = load_tensors(case_dir, case, device)
    base_out = None
    try:
        anchors, base_out, base_name = run_anchors(case, t, args)
        errs = measure_errors(case, t, base_out)
    finally:
        del base_out
        t.clear()
        gc.collect()
        torch.cuda.empty_cache()

    for key in ANCHORS:
        record[key] = anchors[key]
    record["anchor_errors"] = {key: anchors[key]["error"] for key in ANCHORS if anchors[key]["error"]}
    record["speed_ratio"] = {key: speed_ratio(anchors[key]["ms"], ours_ms) for key in ANCHORS}
    record["max_abs_err_o"] = errs["max_abs_err_o"]
    record["max_abs_err_lse"] = errs["max_abs_err_lse"]
    record["flash_max_abs_err_o"] = errs["other_err_o"] if base_name == "fa2" else None
    record["baseline_backend"] = base_name
    record["baseline_max_abs_err_o"] = errs["other_err_o"]
    record["lse_masked_rows_mismatch"] = errs["lse_masked_rows_mismatch"]
    record["nan_in_o"] = errs["nan_in_o"]
    record["nan_in_lse"] = errs["nan_in_lse"]
    record["ok"] = is_ok(errs)
    record["_label"] = case.shape_label
    return record


def is_ok(errs: dict[str, Any]) -> bool:
    if errs["nan_in_o"] or errs["nan_in_lse"]:
        return False
    baseline = errs["other_err_o"] if errs["other_err_o"] is not None else 0.0
    tol = 2.0 * baseline + ABS_FLOOR
    return bool(errs["max_abs_err_o"] <= tol)  # False for NaN errors


def failed_record(name: str, exc: BaseException) -> dict[str, Any]:
    return {"case": name, "error": f"{type(exc).__name__}: {first_line(exc)}", "ok": False,
            "_label": name}


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

def fmt(x: Optional[float], spec: str) -> str:
    return "—" if x is None else format(x, spec)


def progress_line(i: int, n: int, rec: dict[str, Any]) -> str:
    if "error" in rec and rec.get("max_abs_err_o") is None:
        return f"[{i}/{n}] {rec['case']}: FAILED ({rec['error']})"
    parts = [f"attn {fmt(rec['median_ms'], '.3f')} ms ({fmt(rec['tflops'], '.1f')} TFLOP/s)"]
    for key in ANCHORS:
        a = rec[key]
        if a["ms"] is None:
            parts.append(f"{ANCHOR_LABELS[key]} n/a")
        else:
            parts.append(f"{ANCHOR_LABELS[key]} {a['ms']:.3f} ms "
                         f"(x{fmt(rec['speed_ratio'][key], '.2f')})")
    parts.append(f"errO {rec['max_abs_err_o']:.2e} "
                 f"(ref {fmt(rec['baseline_max_abs_err_o'], '.2e')}) "
                 f"errLSE {rec['max_abs_err_lse']:.2e}")
    parts.append("ok" if rec["ok"] else "FAIL")
    return f"[{i}/{n}] {rec['case']}: " + " | ".join(parts)


TABLE_HEADER = ["shape (B, Hq/Hkv, N, D, mask)", "attn ms", "attn TFLOP/s", "FA2 TFLOP/s",
                "cuDNN TFLOP/s", "Flex TFLOP/s", "× FA2", "× cuDNN", "× Flex",
                "max err O (ours)", "max err O (FA2)", "max err LSE", "ok"]


def table_row(rec: dict[str, Any]) -> list[str]:
    if rec.get("max_abs_err_o") is None:
        return [rec["_label"]] + ["—"] * (len(TABLE_HEADER) - 2) + ["no"]
    ref_err = fmt(rec["baseline_max_abs_err_o"], ".2e")
    if rec["baseline_backend"] not in (None, "fa2"):
        ref_err += f" ({rec['baseline_backend']})"
    return [
        rec["_label"],
        fmt(rec["median_ms"], ".3f"),
        fmt(rec["tflops"], ".1f"),
        *(fmt(rec[key]["tflops"], ".1f") for key in ANCHORS),
        *(fmt(rec["speed_ratio"][key], ".2f") for key in ANCHORS),
        fmt(rec["max_abs_err_o"], ".2e"),
        ref_err,
        fmt(rec["max_abs_err_lse"], ".2e"),
        "yes" if rec["ok"] else "NO",
    ]


def render_markdown(run: dict[str, Any], records: list[dict[str, Any]], warmup: int) -> str:
    lines = [
        f"- device: {run['device']}",
        f"- date (UTC): {run['date']}",
        f"- torch: {run['torch']}",
        f"- commit: {run['commit'] or '—'}",
        f"- anchor iters/warmup: {run['iters']}/{warmup} (attn timings from the benchmark's meta.json)",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(TABLE_HEADER) - 2) + [":---:"]) + "|",
    ]
    for rec in records:
        lines.append("| " + " | ".join(table_row(rec)) + " |")
    return "\n".join(lines) + "\n"


def json_safe(obj: Any) -> Any:
    """Replace non-finite floats by None and numpy scalars by Python values."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def append_run(path: Path, run: dict[str, Any]) -> None:
    data: Any = None
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log(f"warning: could not read {path} ({exc})")
    if not (isinstance(data, dict) and isinstance(data.get("runs"), list)):
        if path.exists():
            backup = path.with_name(path.name + ".bak")
            path.replace(backup)
            log(f"warning: {path} did not hold {{\"runs\": [...]}}; moved it to {backup}")
        data = {"runs": []}
    data["runs"].append(json_safe(run))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        log("error: no CUDA device available")
        return 2
    if not args.dir.is_dir():
        log(f"error: {args.dir} is not a directory")
        return 2
    names = read_case_list(args.dir)
    if not names:
        log(f"error: no cases found in {args.dir}")
        return 2

    device = torch.device("cuda")
    run: dict[str, Any] = {
        "date": utc_now(),
        "commit": args.commit,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "kind": "prefill",
        "iters": args.iters,
        "warmup": args.warmup,
        "cases": [],
    }
    log(f"{len(names)} case(s) from {args.dir} on {run['device']}, torch {run['torch']}")

    records: list[dict[str, Any]] = []
    for i, name in enumerate(names, 1):
        log(f"[{i}/{len(names)}] {name} ...")
        try:
            rec = process_case(args.dir, name, args, device)
        except Exception as exc:  # noqa: BLE001 - report and keep going
            traceback.print_exc()
            rec = failed_record(name, exc)
            gc.collect()
            torch.cuda.empty_cache()
        records.append(rec)
        log(progress_line(i, len(names), rec))

    run["cases"] = records
    table = render_markdown(run, records, args.warmup)
    log()
    log(table)
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(table)
    append_run(args.json, run)
    log(f"wrote {args.md} and appended a run to {args.json}")

    failed = [rec for rec in records if not rec.get("ok")]
    if failed:
        log("CORRECTNESS FAILURES:")
        for rec in failed:
            if rec.get("max_abs_err_o") is None:
                log(f"  {rec['case']}: {rec.get('error')}")
            else:
                log(f"  {rec['case']}: max_abs_err_o={rec['max_abs_err_o']:.3e} "
                    f"baseline({rec['baseline_backend']})={fmt(rec['baseline_max_abs_err_o'], '.3e')} "
                    f"nan_in_o={rec['nan_in_o']} nan_in_lse={rec['nan_in_lse']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
