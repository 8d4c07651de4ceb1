"""Benchmark of the TTT Lens kernels: PyTorch reference vs Triton.

    .venv/bin/python bench/kernels.py [--quick]

With CUDA: times the reference and the Triton kernels (forward, dQ-only backward, head Grams) on
qTTT-sized shapes with CUDA events and reports ms, TFLOP/s (model FLOPs: fwd 4·B·Hq·M·N_eff·D,
dq 6·B·Hq·M·N_eff·D, grams 2·n²·(d_in + H·d_head)) and the speed-up.
Without CUDA: Triton cannot be timed (the interpreter simulates programs in numpy, ~100×+ slower
than torch and meaningless as a timing), so only the references are timed on CPU.
The last line printed is one JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import reference  # noqa: E402


def time_fn(fn, device, reps):
    fn()                                             # warm-up (compilation on GPU)
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller shapes / fewer repetitions")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "triton_timed": cuda, "cases": []}
    if cuda:
        dtype = torch.bfloat16
        attn_shapes = [(1, 32, 8, 128, 8192, 128), (1, 32, 8, 128, 32768, 128), (4, 16, 16, 512, 4096, 64)]
        gram_shapes = [(1024, 2048, 16, 128), (4096, 2048, 32, 64)]
        reps = 5 if args.quick else 20
    else:
        print("No CUDA device: Triton kernels cannot be timed here (the TRITON_INTERPRET=1 interpreter "
              "is a numpy simulation for correctness only); timing the PyTorch references on CPU.")
        dtype = torch.float32
        attn_shapes = [(1, 8, 2, 128, 1024 if args.quick else 4096, 64)]
        gram_shapes = [(256, 512, 8, 64)]
        reps = 2 if args.quick else 3
    if cuda:
        from kernels import triton_attention, triton_grams

    for B, Hq, Hkv, M, N, D in attn_shapes:
        off = N - M
        q = torch.randn(B, Hq, M, D, device=device, dtype=dtype)
        k = torch.randn(B, Hkv, N, D, device=device, dtype=dtype)
        v = torch.randn(B, Hkv, N, D, device=device, dtype=dtype)
        do = torch.randn_like(q)
        fl_a = reference.attention_flops(B, Hq, M, N, D, off)
        f_fwd, f_dq = fl_a["fwd"], fl_a["dq"]
        o, lse = reference.attention_with_cache(q, k, v, off)
        row = {"op": "attention", "shape": dict(B=B, Hq=Hq, Hkv=Hkv, M=M, N=N, D=D, q_offset=off),
               "dtype": str(dtype).replace("torch.", ""), "fwd_flops": f_fwd, "dq_flops": f_dq}
        impls = {"torch": reference}
        if cuda:
            impls["triton"] = triton_attention
        for name, mod in impls.items():
            t_f = time_fn(lambda: mod.attention_with_cache(q, k, v, off), device, reps)
            t_b = time_fn(lambda: mod.attention_with_cache_dq(q, k, v, o, lse, do, off), device, reps)
            row[f"{name}_fwd_ms"], row[f"{name}_dq_ms"] = round(t_f, 4), round(t_b, 4)
            row[f"{name}_fwd_tflops"] = round(f_fwd / t_f / 1e9, 4)
            row[f"{name}_dq_tflops"] = round(f_dq / t_b / 1e9, 4)
            print(f"attention {row['shape']} {name:6s}: fwd {t_f:9.3f} ms ({row[f'{name}_fwd_tflops']:.3f} TFLOP/s), "
                  f"dq {t_b:9.3f} ms ({row[f'{name}_dq_tflops']:.3f} TFLOP/s)")
        if cuda:
            row["speedup_fwd"] = round(row["torch_fwd_ms"] / row["triton_fwd_ms"], 3)
            row["speedup_dq"] = round(row["torch_dq_ms"] / row["triton_dq_ms"], 3)
        results["cases"].append(row)

    for n, d_in, H, dh in gram_shapes:
        a = torch.randn(n, d_in, device=device, dtype=dtype)
        b = torch.randn(n, H * dh, device=device, dtype=dtype)
        fl = reference.gram_flops(n, d_in, H, dh)
        row = {"op": "head_grams", "shape": dict(n=n, d_in=d_in, n_heads=H, d_head=dh),
               "dtype": str(dtype).replace("torch.", ""), "flops": fl}
        impls = {"torch": reference.head_grams}
        if cuda:
            impls["triton"] = triton_grams.head_grams
        for name, fn in impls.items():
            t = time_fn(lambda: fn(a, b, H), device, reps)
            row[f"{name}_ms"], row[f"{name}_tflops"] = round(t, 4), round(fl / t / 1e9, 4)
            print(f"head_grams {row['shape']} {name:6s}: {t:9.3f} ms ({row[f'{name}_tflops']:.3f} TFLOP/s)")
        if cuda:
            row["speedup"] = round(row["torch_ms"] / row["triton_ms"], 3)
        results["cases"].append(row)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
