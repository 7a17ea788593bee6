#!/usr/bin/env python3
"""Backward comparison: attn's backward pass against PyTorch's (SDPA flash and cuDNN back ends,
FlexAttention) on the same data, and against float64.

`bench --backward --out DIR` writes, beside each prefill case's forward files (see compare.py),

    do.bin        dO, the output's gradient (same dtype and layout as O)
    dq.bin        our dQ, dk.bin our dK, dv.bin our dV (layouts of Q, K, V)
    dsinks.bin    with sinks: our gradient of each head's sink logit, f32 [heads_q]
    dtable.bin    with a learnable table in the score: our gradient of it, f32
    backward.json the plan that ran (fastest of those timed), its timings, every plan's median

For every case this script

  1. computes float64 gradients on the GPU (autograd through a float64 attention, chunked by
     heads and query rows; fully masked rows contribute nothing) and measures the max abs error
     of our dQ, dK, dV and of the baseline's (SDPA flash, or FlexAttention for the variants SDPA
     cannot express) against them; a case is ``ok`` when each of ours is at most
     ``2 x baseline + 1e-2`` and nothing is NaN;
  2. times each anchor's backward (``torch.autograd.grad`` of a forward kept alive, CUDA events,
     median of --iters after --warmup calls), native GQA first, K/V expanded if that fails;
  3. reports TFLOP/s with the usual convention (backward = 2.5 x the forward's FLOPs) and speed
     ratios (anchor_ms / attn_ms, > 1 means attn is faster).

    python3 bench/backward.py --dir DIR [--iters 10] [--commit SHA] [--json FILE] [--md FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as C  # noqa: E402  (the forward comparison's loaders, masks and anchors)

ANCHORS = ("fa2", "cudnn", "flex")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path)
    return p.parse_args()


def load_case(case_dir: Path, case: C.Case, dev) -> dict[str, torch.Tensor]:
    t = C.load_tensors(case_dir, case, dev)
    b, hq, hkv, sq, sk, d, dv = case.batch, case.hq, case.hkv, case.sq, case.sk, case.d, case.dv
    t["do"] = C.load_half(case_dir / "do.bin", case, (b, hq, sq, dv), dev)
    t["dq"] = C.load_half(case_dir / "dq.bin", case, (b, hq, sq, d), dev)
    t["dk"] = C.load_half(case_dir / "dk.bin", case, (b, hkv, sk, d), dev)
    t["dv"] = C.load_half(case_dir / "dv.bin", case, (b, hkv, sk, dv), dev)
    sinks = case_dir / "dsinks.bin"
    if sinks.is_file():
        t["dsinks"] = torch.from_numpy(C.load_raw(sinks, "<f4", (hq,))).to(dev)
    table = case_dir / "dtable.bin"
    if table.is_file() and case.table is not None:
        t["dtable"] = torch.from_numpy(C.load_raw(table, "<f4", (len(case.table),))).to(dev)
    return t


def mods_of(case: C.Case, dev, table=None):
    """(mask_mod, score_mod, sinks) of the case: the variant's (its score reading `table`), or
    plain causal / none."""
    if case.variant:
        return C.variant_mods(case, dev, table)
    if case.causal:
        offset = case.offset
        return (lambda b, h, q, k: k <= q + offset), None, None
    return None, None, None


def reference_out(q64, k64, v64, i0: int, h0: int, case: C.Case, mods, sinks64):
    """Float64 O of query rows i0.. of heads h0.., differentiable in q, k, v and the sinks."""
    mask_mod, score_mod, _ = mods
    nh, rows, _ = q64.shape
    dev = q64.device
    hs = torch.arange(h0, h0 + nh, device=dev).view(-1, 1, 1)
    qi = torch.arange(i0, i0 + rows, device=dev).view(1, -1, 1)
    kj = torch.arange(k64.shape[1], device=dev).view(1, 1, -1)
    s = torch.matmul(q64, k64.transpose(1, 2)) * case.scale
    if score_mod is not None:
        s = score_mod(s, 0, hs, qi, kj)
    if mask_mod is not None:
        s = s.masked_fill(~mask_mod(0, hs, qi, kj), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    if sinks64 is not None:
        sink = sinks64[h0:h0 + nh].view(-1, 1, 1).expand(nh, rows, 1)
        m = torch.maximum(m, sink)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = (s - m).exp()
    l = p.sum(dim=-1, keepdim=True)
    if sinks64 is not None:
        l = l + (sink - m).exp()
    l = torch.where(l > 0, l, torch.ones_like(l))  # fully masked rows: O = 0, no gradient
    return torch.matmul(p, v64) / l


def reference_grads(case: C.Case, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dev = t["q"].device
    table64 = None
    if case.table is not None:
        table64 = C.case_table(case, dev).double().requires_grad_()
    mods = mods_of(case, dev, table64)
    dtable = torch.zeros_like(table64) if table64 is not None else None
    dq = torch.zeros(t["q"].shape, dtype=torch.float64, device=dev)
    dk = torch.zeros(t["k"].shape, dtype=torch.float64, device=dev)
    dv = torch.zeros(t["v"].shape, dtype=torch.float64, device=dev)
    sinks64 = None
    if mods[2] is not None:
        sinks64 = mods[2].double().clone().requires_grad_()
    dsinks = torch.zeros(case.hq, dtype=torch.float64, device=dev)
    # Autograd keeps a few score-sized tensors alive: a quarter of the forward check's chunk.
    nh, qc = C.plan_chunks(case.hq, case.sq, case.sk)
    if nh > 1:
        nh = max(1, nh // 4)
    else:
        qc = max(1, qc // 4)
    for b in range(case.batch):
        for h0 in range(0, case.hq, nh):
            h1 = min(case.hq, h0 + nh)
            kv_idx = torch.arange(h0, h1, device=dev) // case.group
            k64 = t["k"][b].index_select(0, kv_idx).double().requires_grad_()
            v64 = t["v"][b].index_select(0, kv_idx).double().requires_grad_()
            for i0 in range(0, case.sq, qc):
                i1 = min(case.sq, i0 + qc)
                q64 = t["q"][b, h0:h1, i0:i1].double().requires_grad_()
                o = reference_out(q64, k64, v64, i0, h0, case, mods, sinks64)
                leaves = [q64, k64, v64] + ([sinks64] if sinks64 is not None else []) \
                    + ([table64] if table64 is not None else [])
                grads = torch.autograd.grad(o, leaves, t["do"][b, h0:h1, i0:i1].double(),
                                            allow_unused=True)
                dq[b, h0:h1, i0:i1] = grads[0]
                dk[b].index_add_(0, kv_idx, grads[1])
                dv[b].index_add_(0, kv_idx, grads[2])
                if sinks64 is not None:
                    dsinks += grads[3]
                if table64 is not None and grads[-1] is not None:
                    dtable += grads[-1]
                del o, grads, q64
    out = {"dq": dq, "dk": dk, "dv": dv}
    if sinks64 is not None:
        out["dsinks"] = dsinks
    if dtable is not None:
        out["dtable"] = dtable
    return out


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().amax().item()


def anchor_backward(name: str, case: C.Case, t: dict[str, torch.Tensor], args, keep: bool,
                    table_grad: bool = True):
    """Time one anchor's backward; returns (result, its grads or None). Flex computes a learnable
    table's gradient too, as attn does; where it cannot, it is timed with the table constant and
    the result says so (``table_grad``: false)."""
    from torch.nn.attention import SDPBackend
    result: dict[str, Any] = {"ms": None, "tflops": None, "error": None, "gqa_expanded": False}
    if name in ("fa2", "cudnn") and case.variant:
        result["error"] = f"SDPA cannot express {case.shape_label}"
        return result, None
    leaves = [t[x].detach().clone().requires_grad_() for x in ("q", "k", "v")]
    if name == "flex":
        # A learnable table is a leaf too: Flex computes its gradient, as attn does.
        table = C.case_table(case, t["q"].device)
        if table is not None and table_grad:
            table = table.requires_grad_()
        maker, ctx = C.flex_maker(case, *leaves, table=table), contextlib.nullcontext
        if table is not None and table_grad:
            leaves = leaves + [table]
        if table is not None:
            result["table_grad"] = table_grad
    else:
        backend = SDPBackend.FLASH_ATTENTION if name == "fa2" else SDPBackend.CUDNN_ATTENTION
        maker, ctx = C.sdpa_maker(case, *leaves), C.sdpa_ctx(backend)
    errors = []
    for expanded in ([False, True] if case.gqa else [False]):
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught, ctx():
                warnings.simplefilter("always")
                out = maker(expanded)()
                grads = torch.autograd.grad(out, leaves, t["do"], retain_graph=True)
                torch.cuda.synchronize()
                times = C.time_cuda(
                    lambda: torch.autograd.grad(out, leaves, t["do"], retain_graph=True),
                    args.warmup, args.iters)
        except Exception as exc:  # noqa: BLE001 - an anchor's failure is reported, not fatal
            errors.append(("expanded K/V: " if expanded else "") + C.describe_error(exc, caught or []))
            out = grads = None
            gc.collect()
            torch.cuda.empty_cache()
            continue
        result.update(ms=statistics.median(times), gqa_expanded=expanded)
        result["tflops"] = backward_tflops(case, result["ms"])
        del out
        return result, (grads if keep else None)
    if name == "flex" and table_grad and case.table is not None:
        retry, grads = anchor_backward(name, case, t, args, keep, table_grad=False)
        retry["error_with_table_grad"] = " | ".join(errors)
        return retry, grads
    result["error"] = " | ".join(errors)
    return result, None


def backward_tflops(case: C.Case, ms: Optional[float]) -> Optional[float]:
    fwd = C.tflops(case, ms)
    return None if fwd is None else 2.5 * fwd


def process(out_dir: Path, name: str, args, dev) -> Optional[dict[str, Any]]:
    case_dir = out_dir / name
    if not (case_dir / "backward.json").is_file():
        return None
    meta = json.loads((case_dir / "meta.json").read_text())
    ours = json.loads((case_dir / "backward.json").read_text())
    case = C.Case(name, meta)
    t = load_case(case_dir, case, dev)
    rec: dict[str, Any] = {"case": name, "_label": case.shape_label, "plan": ours["plan"],
                           "default_plan": ours["default_plan"], "plans_ms": ours["plans_ms"],
                           "median_ms": ours["median_ms"],
                           "tflops": backward_tflops(case, ours["median_ms"])}
    baseline = "flex" if case.variant else "fa2"
    base_grads = None
    for key in ANCHORS:
        rec[key], grads = anchor_backward(key, case, t, args, keep=key == baseline)
        if grads is not None:
            base_grads = grads
        rec.setdefault("speed_ratio", {})[key] = C.speed_ratio(rec[key]["ms"], ours["median_ms"])
    ref = reference_grads(case, t)
    errs = {}
    ok = True
    for i, g in enumerate(("dq", "dk", "dv")):
        mine = max_err(t[g], ref[g])
        base = max_err(base_grads[i], ref[g]) if base_grads is not None else None
        errs[g] = {"ours": mine, baseline: base}
        tol = 2.0 * (base or 0.0) + C.ABS_FLOOR
        ok = ok and not torch.isnan(t[g]).any().item() and mine <= tol
    if "dsinks" in ref:
        scale = ref["dsinks"].abs().amax().item()
        errs["dsinks"] = {"ours": max_err(t["dsinks"], ref["dsinks"]), "ref_max": scale}
        ok = ok and errs["dsinks"]["ours"] <= 1e-2 * max(scale, 1.0)
    if "dtable" in ref:
        scale = ref["dtable"].abs().amax().item()
        base = None
        if base_grads is not None and len(base_grads) == 4:
            base = max_err(base_grads[3], ref["dtable"])
        mine = max_err(t["dtable"], ref["dtable"]) if "dtable" in t else float("inf")
        errs["dtable"] = {"ours": mine, baseline: base, "ref_max": scale}
        ok = ok and mine <= max(2.0 * (base or 0.0), 1e-2 * max(scale, 1.0))
    rec["errors"] = errs
    rec["baseline"] = baseline if base_grads is not None else None
    rec["ok"] = bool(ok)
    del t, ref, base_grads
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(run: dict[str, Any], records: list[dict[str, Any]]) -> str:
    lines = [f"Backward, {run['device']} (commit {run['commit']}, {run['date']}; ratios are "
             "anchor ms / attn ms, > 1: attn faster; TFLOP/s = 2.5 x forward FLOPs / time)", "",
             "| case | attn plan | attn ms | TFLOP/s | ×FA2 | ×cuDNN | ×Flex | max err dQ/dK/dV (ours; baseline) | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r and "plan" not in r:
            lines.append(f"| {r['_label']} | failed: {r['error']} | | | | | | | no |")
            continue
        e = r["errors"]
        base = r["baseline"]
        errs = "/".join(fmt(e[g]["ours"], ".3g") for g in ("dq", "dk", "dv"))
        if base:
            errs += "; " + "/".join(fmt(e[g][base], ".3g") for g in ("dq", "dk", "dv")) + f" ({base})"
        sr = r["speed_ratio"]
        lines.append(
            f"| {r['_label']} | {r['plan']} | {r['median_ms']:.3f} | {fmt(r['tflops'], '.0f')} | "
            f"{fmt(sr['fa2'], '.2f')} | {fmt(sr['cudnn'], '.2f')} | {fmt(sr['flex'], '.2f')} | "
            f"{errs} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    run = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": args.commit,
           "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "kind": "backward",
           "iters": args.iters, "warmup": args.warmup}
    records = []
    for name in C.read_case_list(args.dir):
        try:
            rec = process(args.dir, name, args, dev)
        except Exception as exc:  # noqa: BLE001 - one case's failure does not stop the others
            traceback.print_exc()
            rec = {"case": name, "_label": name, "error": f"{type(exc).__name__}: {C.first_line(exc)}",
                   "ok": False}
        if rec is None:
            continue
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "plans_ms"}, default=str), flush=True)
    table = render(run, records)
    print(table)
    if args.md:
        args.md.write_text(table)
    if args.json:
        history = json.loads(args.json.read_text()) if args.json.is_file() else {"runs": []}
        history["runs"].append({**run, "cases": [C.json_safe(r) for r in records]})
        args.json.write_text(json.dumps(history, indent=1) + "\n")
    return 0 if all(r.get("ok") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
