"""The benchmark suite: every case builds, runs and computes what its eager twin computes at a tiny shape on
the CPU; unavailable baselines and OOMs become records; the sweep writes JSON, table and plot; the trainer
step's fused and eager losses agree and its batch doubling stops at the first OOM; the README section."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from benchmarks import cases as cases_module
from benchmarks import measure, report
from benchmarks.__main__ import run_case
from benchmarks.cases import CASES, make_inputs, select

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, H, V = 48, 16, 96


def _run_once(name):
    x = make_inputs(N, H, V, torch.float32, "cpu", seed=1)
    value = CASES[name].build(x, compile_backend="eager")()  # "eager" backend: dynamo traces, no C++ build
    return value, x.hidden.grad.clone(), x.weight.grad.clone()


def _eager_twin(name):
    case = CASES[name]
    if case.family == "modes":
        return case.baseline
    if case.family == "core":
        return name.rsplit("-", 1)[0] + "-eager"
    return f"{name.rsplit('-', 1)[0]}-eager" if case.family == "mask" else f"{case.family}-eager"


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.impl not in ("eager",)])
def test_every_case_runs_and_matches_its_eager_twin(name):
    case = CASES[name]
    reason = case.unavailable("cpu")
    if reason:
        assert reason.startswith("not run: ")
        assert case.impl in ("triton", "liger", "cce", "trl")
        return
    value, d_hidden, d_weight = _run_once(name)
    if case.impl == "trl" and case.family in ("core", "mask"):  # TRL's divergence alone: compare with ours alone
        want, want_hidden, want_weight = _divergence_only(name)
    else:
        want, want_hidden, want_weight = _run_once(_eager_twin(name))
    assert torch.isfinite(value) and d_hidden.abs().sum() > 0 and d_weight.abs().sum() > 0
    torch.testing.assert_close(value, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d_hidden, want_hidden, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(d_weight, want_weight, rtol=1e-3, atol=1e-5)


def _divergence_only(name):
    from pydistill import token_stats

    x = make_inputs(N, H, V, torch.float32, "cpu", seed=1)
    divergence = "reverse_kl" if CASES[name].family == "mask" else name.split("-")[1]
    mask = torch.arange(N) >= int(round((1.0 - CASES[name].active) * N))
    out = token_stats(x.hidden, x.weight, teacher_hidden=x.teacher, divergence=divergence, beta=0.5, mask=mask,
                      impl="eager")
    total = out.divergence.float().sum()
    total.backward()
    return total.detach(), x.hidden.grad.clone(), x.weight.grad.clone()


def test_case_wiring_differs_between_options():
    # the divergences, the clip and the mask really change what runs
    values = {name: _run_once(name)[0] for name in ("core-forward_kl-eager", "core-reverse_kl-eager",
                                                    "core-jsd-eager", "core-forward_kl-clip-eager",
                                                    "mask50-eager")}
    assert len({round(float(v), 5) for v in values.values()}) == len(values)
    x = make_inputs(N, H, V, torch.float32, "cpu")
    CASES["mask75-torch"].build(x)()
    masked_rows = int(round(0.75 * N))
    assert x.hidden.grad[:masked_rows].abs().sum() == 0 and x.hidden.grad[masked_rows:].abs().sum() > 0


def test_flops_per_case():
    n, h, v = 1024, 576, 49152
    assert CASES["core-jsd-clip-torch"].flops(n, h, v) == 12 * n * h * v
    assert CASES["ce-torch"].flops(n, h, v) == CASES["grpo-ours"].flops(n, h, v) == 6 * n * h * v
    assert CASES["distill-liger"].flops(n, h, v) == 12 * n * h * v
    assert CASES["mask75-torch"].flops(n, h, v) == 12 * (n // 4) * h * v


def test_select_families_and_unknown_names():
    assert select(["grpo"]) == ["grpo-eager", "grpo-ours", "grpo-liger"]
    assert len(select(["all"])) == len(CASES)
    with pytest.raises(ValueError, match="unknown case"):
        select(["core-kl"])


def test_unavailable_baselines_are_recorded(monkeypatch):
    args = SimpleNamespace(cap_gb=None, repeats=1, input_sets=1, timeout=60)
    expected = {"core-reverse_kl-triton": "not run: needs CUDA"}
    if not cases_module._module_available("liger_kernel"):
        expected["distill-liger"] = expected["grpo-liger"] = "not run: liger-kernel not installed"
    if not cases_module._module_available("cut_cross_entropy"):
        expected["ce-cce"] = "not run: cut-cross-entropy not installed"
    for name, status in expected.items():
        record = run_case(name, 256, 576, 49152, "float32", "cpu", args)
        assert record["status"] == status and record["case"] == name and record["flops"] > 0
    # installed but no GPU: still a record, with the reason
    monkeypatch.setattr(cases_module, "_module_available", lambda name: True)
    assert CASES["grpo-liger"].unavailable("cpu") == "not run: needs CUDA"


def test_oom_becomes_a_record(monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(measure, "measure_case", out_of_memory)
    measure.main(["core-reverse_kl-eager", "--n", "64", "--h", "16", "--v", "96", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out)["status"] == "OOM"

    # a case process killed by the kernel (SIGKILL) is an OOM too
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, -9, "", ""))
    args = SimpleNamespace(cap_gb=8.0, repeats=1, input_sets=1, timeout=60)
    assert run_case("core-reverse_kl-eager", 64, 16, 96, "float32", "cpu", args)["status"] == "OOM"


def test_benchmark_sweep_smoke(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--shapes", "cpu-small", "--n", "64", "--repeats", "1",
                           "--cases", "mask0-eager", "mask0-torch", "mask50-torch", "core-reverse_kl-triton",
                           "distill-liger", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    status = {r["case"]: r["status"] for r in data["records"]}
    assert status["mask0-eager"] == status["mask0-torch"] == status["mask50-torch"] == "ok"
    assert status["core-reverse_kl-triton"] == "not run: needs CUDA"
    assert status["distill-liger"].startswith("not run: ")
    ok = [r for r in data["records"] if r["status"] == "ok"]
    assert all(r["ms"] > 0 and r["gflops"] > 0 and r["matmul_gflops"] > 0 for r in ok)
    assert {r["flops"] for r in ok if r["case"] == "mask50-torch"} == {12 * 32 * 576 * 8192}
    table = (out / "results.md").read_text()
    assert "| mask0-torch | cpu-small | 64 | 576 | 8192 |" in table and data["date"] in table
    assert "| mask50-torch | mask0-eager |" in table  # the ratio vs eager
    assert "| mask50-torch | cpu-small | 64 | float32 | 50% |" in table  # the masked ratio
    assert (out / "results.png").stat().st_size > 1000


def _trainer_results(records, stops):
    return dict(kind="trainer", date="2026-01-02", command="python -m benchmarks.trainer_step", device="cpu",
                device_name="Test CPU", cap_gb=4.0, model=dict(name="tiny", layers=2, hidden=32, vocab=384),
                completion_len=8, divergence="forward_kl", clip=0.05, stops=stops, torch=torch.__version__,
                records=records)


def test_trainer_step_doubles_until_oom(tmp_path):
    from benchmarks.trainer_step import parse_args, sweep

    args = parse_args(["--device", "cpu", "--max-batch", "64", "--completion-len", "8"])
    limits = {"fused": 16, "eager": 2}
    seen = []

    def fake_runner(args, loss, batch):
        seen.append((loss, batch))
        if batch > limits[loss]:
            return dict(status="OOM")
        return dict(status="ok", tokens=8 * batch, step_s=0.1 * batch, tokens_per_s=80.0, peak_mb=100.0 * batch,
                    extra_mb=10.0 * batch)

    records, stops = sweep(args, runner=fake_runner)
    assert seen == [("fused", b) for b in (1, 2, 4, 8, 16, 32)] + [("eager", b) for b in (1, 2, 4)]
    assert [r["status"] for r in records].count("OOM") == 2
    assert stops == {"fused": "OOM at batch 32", "eager": "OOM at batch 4"}
    results = _trainer_results(records, stops)
    text = report.render_markdown(results)
    assert "fused loss: 16 rollouts (128 tokens)" in text and "eager loss: 2 rollouts (16 tokens)" in text
    assert "| eager | 4 | 32 | | | | | OOM |" in text
    paths = report.write_outputs(results, str(tmp_path))
    assert os.path.getsize(paths["png"]) > 1000


def test_trainer_step_fused_and_eager_losses_agree():
    from benchmarks.trainer_step import make_trainer
    from pydistill.boundary import read_head

    out = {}
    for loss in ("fused", "eager"):
        trainer, described = make_trainer(loss, 2, model="tiny", completion_len=6, prompt_len=4,
                                          teacher_prompt_len=7, clip=None)
        with torch.no_grad():  # a student away from its frozen teacher, so the divergence is not ~0
            torch.manual_seed(1)
            for p in trainer.model.parameters():
                p.add_(0.3 * torch.randn_like(p) * p.std())
        value = trainer.loss(trainer.fixed_batch, 12.0)
        value.loss.backward()
        out[loss] = (value.loss.detach(), read_head(trainer.model).weight.grad.clone(), value.metrics["tokens"])
        metrics = trainer.training_step()  # the measured step runs without generation
        assert metrics["trained_tokens"] == 12
    assert out["fused"][2] == out["eager"][2] == 12 and described["vocab"] == 384
    assert out["fused"][0] > 1e-3
    torch.testing.assert_close(out["fused"][0], out["eager"][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["fused"][1], out["eager"][1], rtol=1e-3, atol=1e-6)


def test_readme_results_section(tmp_path):
    results_dir = tmp_path / "benchmarks" / "results" / "trainer-step"
    records = [dict(loss="fused", batch=1, tokens=8, status="ok", step_s=0.5, tokens_per_s=16.0, peak_mb=900.0,
                    extra_mb=10.0)]
    report.write_outputs(_trainer_results(records, {"fused": "max batch 1 reached"}), str(results_dir))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\nintro\n\n{report.START}\nold numbers\n{report.END}\n\n## Next\ntail\n")
    json_path = str(results_dir / "results.json")
    report.main(["--readme", json_path, "--readme-path", str(readme)])
    text = readme.read_text()
    section = text.split(report.START)[1].split(report.END)[0]
    assert "old numbers" not in text and text.startswith("# Project\n\nintro") and text.endswith("## Next\ntail\n")
    assert "Test CPU" in section and "2026-01-02" in section
    assert "](benchmarks/results/trainer-step/results.png)" in section and "*Test CPU, 2026-01-02*" in section
    # idempotent: a second run replaces the section, it does not add one
    report.update_readme(str(readme), [json_path])
    assert readme.read_text().count(report.START) == 1
    bare = tmp_path / "BARE.md"
    bare.write_text("# Bare\n")
    report.update_readme(str(bare), [json_path])
    assert report.START in bare.read_text() and bare.read_text().startswith("# Bare\n")


def test_gradient_sparsity_counts_all_small_tiles():
    """Issue 25 item 6's measure: a tile counts when every entry is below the threshold; edge tiles count on
    their real entries; the dropped mass is the largest per-row sum over skipped tiles."""
    from benchmarks.gradient_sparsity import tile_shares

    grad = torch.full((5, 6), 1e-5)
    grad[0, 0] = 0.5  # one large entry: its 2x4 tile (rows 0-1, cols 0-3) is not skippable
    shares = tile_shares(grad, 2.0 ** -12, tiles=((2, 4), (5, 6)))
    # 2x4 tiles over 5x6 (padded to 6x8): 3 x 2 = 6 tiles, one holds the 0.5
    assert shares["2x4"]["share"] == pytest.approx(5 / 6)
    # rows 2-4 lose all six entries (6e-5), rows 0-1 only columns 4-5
    assert shares["2x4"]["max_row_dropped"] == pytest.approx(6e-5, rel=1e-6)
    assert shares["5x6"] == {"share": 0.0, "max_row_dropped": 0.0}


def test_gradient_sparsity_measures_the_models_own_float64_gradients(monkeypatch):
    """measure() scores through the whole head (bias, softcap) in float64: its entry share is that of
    onehot - q and q - p computed here from the capped, biased logits."""
    import argparse

    import benchmarks.topk_teacher as topk_teacher
    from benchmarks.gradient_sparsity import measure
    from pydistill.boundary import Head

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    weight, bias = torch.randn(300, 5, generator=g) * 3, torch.randn(300, generator=g) * 3
    targets = torch.randint(0, 300, (7,), generator=g)
    head = Head(weight=weight, bias=bias, softcap=2.0, scale=1.0)
    monkeypatch.setattr(topk_teacher, "opsd_rollout_rows", lambda args: (student, teacher, head, 2, targets))
    got = measure(argparse.Namespace(threshold_log2=-12))

    def probs(h):
        z = h.double() @ weight.double().t() + bias.double()
        return torch.softmax(2.0 * torch.tanh(z / 2.0), -1)

    q, p = probs(student), probs(teacher)
    onehot = torch.nn.functional.one_hot(targets, 300).double()
    for name, grad in (("logp", onehot - q), ("forward_kl", q - p)):
        want = float((grad.abs() < 2.0 ** -12).double().mean())
        assert got["gradients"][name]["entries_below"] == pytest.approx(want, abs=1e-12)
