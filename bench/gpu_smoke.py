"""Smoke test of every fused fastmeta op on a GPU: each fast backend's forward and backward
against a float64 reference, as independent cases (one failure hides nothing), one JSON line
per case. Run by ``bench/device_check.sh`` on a lent GPU machine; runs on the CPU too (Triton
through the interpreter: ``TRITON_INTERPRET=1 python bench/gpu_smoke.py --device cpu``).

A case passes when every output and gradient is within 2x the error of plain PyTorch at the
same dtype of the float64 reference, plus a small atol (the DESIGN.md rule). Each line records
op, backend, dtype, shape, TF32 on/off, the errors and the seconds, or the exception.

    python bench/gpu_smoke.py [--device cuda] [--out FILE.jsonl] [--only TEXT] [--tf32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

import fastmeta.ops as fm

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    res = []
    for o in out:
        if o is not None:
            res += _tensors(o)
    return res


def _run(fn, inputs, weights=None):
    """Outputs of fn(*inputs) and the gradients of sum(w * output) w.r.t. the float inputs."""
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = [o for o in _tensors(fn(*leaves)) if o.is_floating_point()]
    diff = [x for x in leaves if x.requires_grad]
    if weights is None:
        g = torch.Generator().manual_seed(7)
        weights = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    grads = []
    if any(o.requires_grad for o in outs):
        obj = sum((o.double() * w.to(o.device)).sum() for o, w in zip(outs, weights) if o.requires_grad)
        grads = [gr for gr in torch.autograd.grad(obj, diff, allow_unused=True) if gr is not None]
    return [t.detach() for t in outs + grads], weights


def _err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item() if a.numel() else 0.0


def check(fast_fn, ref_fn, inputs, dtype):
    """(ok, largest error of the fast backend, largest error of PyTorch at the same dtype)
    over every output and gradient, both against the float64 reference."""
    to64 = [x.double() if x.is_floating_point() else x for x in inputs]
    oracle, w = _run(ref_fn, to64)
    fast, _ = _run(fast_fn, inputs, w)
    same, _ = _run(ref_fn, inputs, w)
    if len(fast) != len(oracle):
        raise AssertionError(f"{len(fast)} outputs+grads from the fast backend, {len(oracle)} from the reference")
    ok, err, ref_err = True, 0.0, 0.0
    for f, s, o in zip(fast, same, oracle):
        if f.shape != o.shape:
            raise AssertionError(f"shape {tuple(f.shape)} != reference {tuple(o.shape)}")
        e, r = _err(f, o), _err(s, o)
        ok &= e <= 2 * r + ATOL[dtype] and bool(torch.isfinite(f).all() or not torch.isfinite(o).all())
        err, ref_err = max(err, e), max(ref_err, r)
    return ok, err, ref_err


def cases(device):
    """(op, backend, shape label, dtype, fast_fn, ref_fn, inputs) for every fused op."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    def labels(B, S, N):
        return (torch.arange(S) % N).expand(B, S).contiguous().to(device)

    out = []
    proto_shapes = [(8, 75, 5, 1600), (1, 1, 1, 1), (2, 17, 33, 15)]
    match_shapes = [(8, 75, 25, 5, 1600), (1, 1, 1, 1, 1), (2, 17, 33, 16, 15)]
    for dtype in DTYPES:
        for B, Q, N, D in proto_shapes:
            S = 5 * N
            sup, lab = rnd(B, S, D, dtype=dtype), labels(B, S, N)
            out.append(("prototypes", "triton", f"B{B} S{S} N{N} D{D}", dtype,
                        lambda s, l=lab, n=N: fm.prototypes(s, l, n, backend="triton"),
                        lambda s, l=lab, n=N: fm.prototypes_ref(s, l, n), [sup]))
            q, p = rnd(B, Q, D, dtype=dtype), rnd(B, N, D, dtype=dtype)
            ql = torch.randint(0, N, (B, Q), generator=g).to(device)
            for metric in ("sqeuclidean", "cosine"):
                sc = 1.0 if metric == "sqeuclidean" else 10.0
                out.append(("proto_loss", "triton", f"B{B} Q{Q} N{N} D{D} {metric}", dtype,
                            lambda a, b, l=ql, m=metric, s=sc: fm.proto_loss(a, b, l, m, s, "none", backend="triton")[0],
                            lambda a, b, l=ql, m=metric, s=sc: fm.proto_loss_ref(a, b, l, m, s, "none")[0],
                            [q, p]))
                out.append(("proto_logits", "triton", f"B{B} Q{Q} N{N} D{D} {metric}", dtype,
                            lambda a, b, m=metric, s=sc: fm.proto_logits(a, b, m, s, backend="triton"),
                            lambda a, b, m=metric, s=sc: fm.proto_logits_ref(a, b, m, s), [q, p]))
        for B, Q, S, N, D in match_shapes:
            q, s = rnd(B, Q, D, dtype=dtype), rnd(B, S, D, dtype=dtype)
            lab = labels(B, S, N)
            ql = torch.randint(0, N, (B, Q), generator=g).to(device)
            out.append(("matching_attention", "triton", f"B{B} Q{Q} S{S} N{N} D{D}", dtype,
                        lambda a, b, l=lab, n=N: fm.matching_attention(a, b, l, n, 10.0, backend="triton"),
                        lambda a, b, l=lab, n=N: fm.matching_attention_ref(a, b, l, n, 10.0), [q, s]))
            out.append(("matching_loss", "triton", f"B{B} Q{Q} S{S} N{N} D{D}", dtype,
                        lambda a, b, l=lab, n=N, y=ql: fm.matching_loss(a, b, l, n, y, 10.0, "none", backend="triton")[0],
                        lambda a, b, l=lab, n=N, y=ql: fm.matching_loss_ref(a, b, l, n, y, 10.0, "none")[0],
                        [q, s]))
        for T, N, sizes, act in [(25, 10, (1, 40, 40, 1), "relu"), (4, 17, (2, 16, 15, 3), "tanh"),
                                 (2, 64, (64, 64, 64), "sigmoid"), (2, 1, (3, 1), "tanh")]:
            pairs = list(zip(sizes[:-1], sizes[1:]))
            ws = [rnd(T, o, i, dtype=dtype) / i**0.5 for i, o in pairs]
            bs = [rnd(T, o, dtype=dtype) for _, o in pairs]
            vw = [rnd(T, o, i, dtype=dtype) for i, o in pairs]
            vb = [rnd(T, o, dtype=dtype) for _, o in pairs]
            x, y = rnd(T, N, sizes[0], dtype=dtype), rnd(T, N, sizes[-1], dtype=dtype)
            L = len(pairs)

            def split(args, L=L):
                return list(args[:L]), list(args[L:2 * L]), args[2 * L], args[2 * L + 1], \
                    list(args[2 * L + 2:3 * L + 2]), list(args[3 * L + 2:])

            out.append(("mlp_grad_hvp", "triton", f"T{T} N{N} {'-'.join(map(str, sizes))} {act}", dtype,
                        lambda *a, act=act, sp=split: fm.mlp_grad_hvp(*sp(a), act, "mse", backend="triton"),
                        lambda *a, act=act, sp=split: fm.mlp_grad_hvp_ref(*sp(a), act, "mse"),
                        [*ws, *bs, x, y, *vw, *vb]))
        # the AOT quick set's shapes (device_check compiles them while building) + a block edge
        for B, C, D in [(16, 100, 5), (128, 512, 64), (1, 1, 1), (3, 33, 15)]:
            mu, var = rnd(B, C, D, dtype=dtype), rnd(B, C, D, dtype=dtype).abs() + 0.1
            keep = torch.rand(B, C, generator=g) < 0.7
            keep[:, 0] = True
            out.append(("gaussian_product", "triton", f"B{B} C{C} D{D}", dtype,
                        lambda a, b, k=keep.to(device): fm.gaussian_product(a, b, k, backend="triton"),
                        lambda a, b, k=keep.to(device): fm.gaussian_product_ref(a, b, k), [mu, var]))
        T = 32
        params = [rnd(T, 64, 3, 3, 3, dtype=dtype), rnd(T, 64, dtype=dtype), rnd(T, 5, 1600, dtype=dtype)]
        grads = [rnd(*p.shape, dtype=dtype) for p in params]
        n = len(params)
        out.append(("inner_update", "cuda", "T32 conv4-like", dtype,
                    lambda *a, n=n: fm.inner_update(list(a[:n]), list(a[n:]), 0.4, backend="cuda"),
                    lambda *a, n=n: fm.inner_update_ref(list(a[:n]), list(a[n:]), 0.4),
                    [*params, *grads]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="append one JSON line per case here")
    ap.add_argument("--only", action="append", default=[], help="cases whose label contains TEXT")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 matmuls (default off)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    sink = open(args.out, "a") if args.out else None
    n_ok = n_all = 0
    for op, backend, shape, dtype, fast, ref, inputs in cases(device):
        label = f"{op} {backend} {str(dtype).replace('torch.', '')} {shape}"
        if args.only and not any(o in label for o in args.only):
            continue
        n_all += 1
        row = {"case": label, "op": op, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
               "shape": shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "tf32": args.tf32, "torch": torch.__version__}
        t0 = time.time()
        try:
            ok, err, ref_err = check(fast, ref, inputs, dtype)
            row.update(ok=ok, max_abs_err=err, torch_abs_err=ref_err)
        except Exception as exc:  # noqa: BLE001 - every case is independent
            row.update(ok=False, error=traceback.format_exception_only(exc)[-1].strip()[:500])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["seconds"] = round(time.time() - t0, 3)
        n_ok += row["ok"]
        line = json.dumps(row)
        print(("PASS " if row["ok"] else "FAIL ") + label
              + (f"  err {row['max_abs_err']:.2e} (torch {row['torch_abs_err']:.2e})" if "max_abs_err" in row
                 else f"  {row.get('error', '')}"), flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()
    print(f"gpu_smoke: {n_ok}/{n_all} cases passed on {device}")
    return 0 if n_ok == n_all else 1


if __name__ == "__main__":
    sys.exit(main())
