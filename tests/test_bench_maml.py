"""Smoke tests of bench/bench_maml.py and its modules: the float64 correctness gate, one (row,
config) measurement in-process and in a fresh process, the table and JSON lines, the command
line's checks, and the target bookkeeping. Peers (higher, TorchOpt, learn2learn) are optional:
their rows are "skipped" where they are not installed; the bench itself must import."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

# a broken import of the bench (or of fastmeta under it) fails collection: never a skip
import _common as C  # noqa: E402
import _maml_child as child  # noqa: E402
import _maml_gate as gate_mod  # noqa: E402
import _maml_impls as impls  # noqa: E402
import _maml_rows as rows_mod  # noqa: E402
import _maml_targets as targets  # noqa: E402
import _maml_workload as W  # noqa: E402
import bench_maml  # noqa: E402


def test_gate_all_rows_agree_with_the_naive_loop_in_float64():
    torch.set_num_threads(1)
    gate = gate_mod.run_gate(torch.device("cpu"), W.ALL_IMPLS, log=lambda _m: None)
    assert set(gate) == {"mlp", "conv4"}
    for model_kind, rows in gate.items():
        assert rows["reference"][0] == "ok", rows["reference"]
        for name in ("fastmeta", "fastmeta chunk", "fastmeta clone/adapt", "bmm"):
            if name in rows:
                status, err, msg = rows[name]
                assert status == "ok" and err <= 1e-9, (model_kind, name, status, err, msg)
        for name in ("higher", "torchopt", "l2l"):
            assert rows[name][0] in ("ok", "skipped"), (model_kind, name, rows[name])
    assert gate["mlp"]["vmap"][0] == "ok"
    # torch.func vmap + grad through training-mode BatchNorm: a known upstream mismatch (see
    # the bench's docstring); whichever way it goes, the gate must have measured it.
    assert gate["conv4"]["vmap"][0] in ("ok", "WRONG") and gate["conv4"]["vmap"][1] is not None


def test_gate_catches_a_wrong_meta_gradient(monkeypatch):
    def first_order_naive(model, cfg):  # drops the second-order term: must fail the gate
        k, lr, loss_fn = cfg["k"], cfg["lr"], W.loss_fn_of(cfg)

        def step(sx, sy, qx, qy):
            params = dict(model.named_parameters())
            total = 0.0
            for t in range(sx.shape[0]):
                p = params
                for _ in range(k):
                    g = torch.autograd.grad(loss_fn(torch.func.functional_call(model, p, (sx[t],)),
                                                    sy[t]), list(p.values()))
                    p = {n: w - lr * gi for (n, w), gi in zip(p.items(), g)}
                total = total + loss_fn(torch.func.functional_call(model, p, (qx[t],)), qy[t])
            loss = total / sx.shape[0]
            loss.backward()
            return loss.detach()

        return step

    monkeypatch.setitem(impls.MAKERS, "bmm", first_order_naive)
    gate = gate_mod.run_gate(torch.device("cpu"), ["naive", "bmm"], log=lambda _m: None)
    assert gate["mlp"]["bmm"][0] == "WRONG"


def test_child_measures_time_memory_and_gradients(tmp_path):
    cfg = dict(W.CONFIGS["sinusoid-k1"], T=4)
    spec = dict(cfg=cfg, impl="fastmeta", device="cpu", dtype="float32", seed=1, threads=1,
                reps=2, grads_path=str(tmp_path / "g.pt"))
    res = child.child_main(spec)
    assert res["status"] == "ok" and len(res["times_ms"]) == 2
    assert res["cold_ms"] > 0 and res["rss_peak_mb"] >= 0
    g = torch.load(tmp_path / "g.pt")
    assert g.numel() == W.param_count(cfg) and torch.isfinite(g).all() and g.abs().sum() > 0


def test_targets_are_marked_hit_or_miss():
    cfg = W.config_of("conv4-k5", quick=False)

    def row(config, impl, ms, mb):
        c = dict(cfg, k=int(config.rsplit("k", 1)[1]))
        return rows_mod.Row(config, c, impl, impl in W.PEERS, "ok", median_ms=ms, rss_peak_mb=mb)

    rows = {
        "conv4-k5": [row("conv4-k5", "naive", 5300, 3100), row("conv4-k5", "higher", 6900, 600),
                     row("conv4-k5", "vmap", 9200, 6100), row("conv4-k5", "fastmeta", 2000, 900),
                     row("conv4-k5", "fastmeta chunk", 3000, 800)],
        "conv4-k1": [row("conv4-k1", "fastmeta", 500, 800)],
        "conv4-k10": [row("conv4-k10", "fastmeta", 4000, 850),
                      row("conv4-k10", "naive", 9000, 6000),
                      row("conv4-k10", "vmap", 15000, 12000)],
    }
    res = targets.evaluate_targets(rows, torch.device("cpu"), False, None)
    by = {t.name: t.status for t in res}
    assert by["conv4-k5: fastmeta >= 1.5x fastest sequential peer"] == "hit"  # 5300/2000
    assert by["conv4-k5: fastmeta >= 2x vmap"] == "hit"
    assert by["conv4-k10: fastmeta memory <= 0.5x naive"] == "hit"
    assert by["conv4-k5: task_chunk memory <= 1.5x higher"] == "hit"  # 800 <= 900
    assert by["conv4-k5: task_chunk faster than higher"] == "hit"


def test_child_process_returns_its_measurement(tmp_path):
    # the fresh-process path bench_maml.py takes for every row: python bench/_maml_child.py SPEC
    cfg = dict(W.CONFIGS["sinusoid-k1"], T=2)
    spec = dict(cfg=cfg, impl="naive", device="cpu", dtype="float32", seed=1, threads=1,
                reps=1, grads_path=str(tmp_path / "g.pt"))
    res = child.run_child(spec, timeout=300)
    assert res["status"] == "ok", res
    assert len(res["times_ms"]) == 1 and len(res["cpu_times_ms"]) == 1 and res["threads"] == 1
    assert torch.load(tmp_path / "g.pt").numel() == W.param_count(cfg)


def test_rows_print_a_table_and_append_json_lines(tmp_path, capsys):
    cfg = W.config_of("sinusoid-k1", quick=True)
    rows = [rows_mod.Row("sinusoid-k1", cfg, "naive", True, "ok", median_ms=10.0, p20_ms=9.0,
                         p80_ms=11.0, n=3, rss_peak_mb=5.0),
            rows_mod.Row("sinusoid-k1", cfg, "fastmeta", False, "ok", median_ms=2.5, p20_ms=2.0,
                         p80_ms=3.0, n=3, rss_peak_mb=1.0),
            rows_mod.Row("sinusoid-k1", cfg, "higher", True, "skipped", message="not installed")]
    C.fill_group_speedups(rows)
    assert rows[1].speedups == {"naive": 4.0} and rows[2].speedups == {"naive": None}
    text = rows_mod.print_table("sinusoid-k1", rows, torch.device("cpu"), 1)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("impl"))
    assert lines[header].split()[:5] == ["impl", "wall", "ms", "p20", "p80"]
    assert "x naive" in lines[header] and "peak RSS MB" in lines[header]
    assert set(lines[header + 1].replace(" ", "")) == {"-"}
    assert lines[header + 3].split()[:3] == ["fastmeta", "2.500", "2.000"]
    assert lines[header + 3].split()[4] == "4.00"  # x naive
    assert lines[header + 4].split() == ["higher", "SKIPPED"]
    assert "higher: skipped: not installed" in text
    assert capsys.readouterr().out.strip("\n") == text.strip("\n")
    target = targets.Target("t", "hit", "detail")
    path = rows_mod.save_rows(rows, [target], None, torch.device("cpu"), tmp_path, dict(quick=True))
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert path.name.startswith("maml-") and len(recs) == 4
    assert [r["kind"] for r in recs] == ["meta-step"] * 3 + ["target"]
    assert recs[1]["impl"] == "fastmeta" and recs[1]["speedup_vs"] == {"naive": 4.0}
    assert all(r["bench"] == "maml" and r["quick"] is True and "git_sha" in r for r in recs)


def test_command_line_rejects_unknown_names():
    with pytest.raises(SystemExit, match="unknown config"):
        bench_maml.main(["--configs", "sinusoid-k2", "--no-save"])
    with pytest.raises(SystemExit, match="unknown impl"):
        bench_maml.main(["--configs", "sinusoid-k1", "--impls", "fastmeta,maml++", "--no-save"])
