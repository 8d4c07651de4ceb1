"""The memory guard (ttt_core.memory_guard): available memory, estimates, refusals with advice,
and out-of-memory errors turned into the same clear message."""

from __future__ import annotations

import gc
import re
import weakref

import pytest
import torch

from ttt_core import memory_guard as mg
from ttt_core.models import build_tiny_model
from ttt_core.prompt_kernel import KernelMemoryError, PromptKernelError, compute_prompt_kernel
from ttt_core.prompts import FewShotPrompt, LongContextPrompt
from ttt_core.qttt import QTTTConfig, QTTTRun

TEXT = ("The river bends twice before it reaches the old mill, and the farmers who live along it grow "
        "barley, oats and a little rye. ") * 3
PROMPT = LongContextPrompt(context=TEXT, question="What do the farmers grow?", answer="barley")
MB = 1 << 20


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("llama", seed=1)


def _limit(monkeypatch, nbytes: float) -> None:
    monkeypatch.setenv(mg.ENV_LIMIT, repr(nbytes / MB))


def _kernel_est(lm, max_positions: int, **kw) -> mg.MemoryEstimate:
    from ttt_core.encoding import encode_long_context
    from ttt_core.prompt_kernel import _memory_plan

    enc = encode_long_context(lm, PROMPT, max_positions)
    return _memory_plan(lm, enc, kw.get("subspace", "q"), kw.get("qttt", True), kw.get("row_chunk", 128), 8,
                        max_positions)[0]


# ------------------------------------------------------------------ available memory


def test_env_override(monkeypatch):
    monkeypatch.setenv(mg.ENV_LIMIT, "12.5")
    avail, source = mg.available_memory()
    assert avail == int(12.5 * MB) and mg.ENV_LIMIT in source
    monkeypatch.setenv(mg.ENV_LIMIT, "lots")
    with pytest.raises(ValueError, match=mg.ENV_LIMIT):
        mg.available_memory()


def test_available_memory_without_override(monkeypatch):
    monkeypatch.delenv(mg.ENV_LIMIT, raising=False)
    avail, source = mg.available_memory()
    assert avail is None or avail >= 0
    assert source


def test_cgroup_v1_and_v2_files(tmp_path):
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    # v2: limit 1000 MB, usage 300 MB of which 100 MB reclaimable page cache
    (root / "grp").mkdir(parents=True)
    (root / "grp" / "memory.max").write_text(str(1000 * MB))
    (root / "grp" / "memory.current").write_text(str(300 * MB))
    (root / "grp" / "memory.stat").write_text(f"anon 1\ninactive_file {100 * MB}\n")
    proc.write_text("0::/grp\n")
    assert mg._cgroup_available(root, proc) == 800 * MB
    (root / "grp" / "memory.max").write_text("max")
    assert mg._cgroup_available(root, proc) is None
    # v1
    d = root / "memory" / "a" / "b"
    d.mkdir(parents=True)
    (d / "memory.limit_in_bytes").write_text(str(2000 * MB))
    (d / "memory.usage_in_bytes").write_text(str(500 * MB))
    (d / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {50 * MB}\n")
    proc.write_text("4:memory:/a/b\n3:cpu:/\n")
    assert mg._cgroup_available(root, proc) == 1550 * MB
    (d / "memory.limit_in_bytes").write_text("9223372036854771712")       # "no limit"
    assert mg._cgroup_available(root, proc) is None


def test_meminfo(tmp_path):
    p = tmp_path / "meminfo"
    p.write_text("MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n")
    assert mg._meminfo_available(p) == 1000 * 1024


# ------------------------------------------------------------------ estimates


def test_estimates_are_monotone(tiny):
    kern = [mg.frozen_kv_kernel_estimate(tiny, 4096, n).total for n in (16, 64, 256, 1024, 2048)]
    assert kern == sorted(kern) and kern[0] < kern[-1]
    kern_t = [mg.frozen_kv_kernel_estimate(tiny, t, 256).total for t in (300, 1000, 2000, 4000)]
    assert kern_t == sorted(kern_t) and kern_t[0] < kern_t[-1]
    chunked = [mg.frozen_kv_kernel_estimate(tiny, 8192, n, row_chunk=128).total for n in (256, 512, 2048)]
    assert chunked == sorted(chunked)
    exact = [mg.exact_per_output_estimate(tiny, 512, m, "v").total for m in (8, 32, 128)]
    assert exact == sorted(exact) and exact[0] < exact[-1]
    exact_t = [mg.exact_per_output_estimate(tiny, t, 32, "mlp_up").total for t in (64, 256, 1024)]
    assert exact_t == sorted(exact_t) and exact_t[0] < exact_t[-1]
    q_span = [mg.qttt_estimate(tiny, 2048, k).total for k in (16, 128, 512)]
    q_tok = [mg.qttt_estimate(tiny, t, 128).total for t in (256, 1024, 8192)]
    assert q_span == sorted(q_span) and q_tok == sorted(q_tok) and q_tok[0] < q_tok[-1]
    gd = [mg.paper_gd_estimate(tiny, [40] * n, 0).total for n in (4, 8, 16)]
    assert gd == sorted(gd) and gd[0] < gd[-1]
    assert mg.paper_gd_estimate(tiny, [40] * 8, 2).total < mg.paper_gd_estimate(tiny, [40] * 8, 0).total


def test_smollm2_shaped_formula_values():
    """The documented per-part formulas, on SmolLM2-like shapes (no weights needed)."""
    s = mg.Shapes(L=30, d=576, f=1536, V=49152, Hq=9, Hkv=3, hd=64, b=4)
    assert mg._kv(s, 1) == 2 * 30 * 3 * 64 * 4                         # 46 KB per token
    assert mg._graph(s, 1, 30) == 30 * (8 * 576 + 4 * 1536) * 4          # ~1.3 MB per frozen-KV row
    assert mg._gram(2048) == 5 * 2048 ** 2 * 8


# ------------------------------------------------------------------ refusals


def test_kernel_refused_with_a_setting_that_fits(tiny, monkeypatch):
    small, big = _kernel_est(tiny, 8).total, _kernel_est(tiny, 200).total
    assert small < big
    _limit(monkeypatch, (small + big) / 2)
    with pytest.raises(KernelMemoryError) as info:
        compute_prompt_kernel(tiny, PROMPT, "q", max_positions=200)
    exc = info.value
    assert isinstance(exc, PromptKernelError) and isinstance(exc, mg.MemoryBudgetError) and isinstance(exc, ValueError)
    msg = str(exc)
    assert "max_positions ≤" in msg and mg.ENV_LIMIT in msg and "MB" in msg
    m = int(re.search(r"max_positions ≤ ([\d,]+)", msg).group(1).replace(",", ""))
    assert 8 <= m < 200
    ev = compute_prompt_kernel(tiny, PROMPT, "q", max_positions=m)          # the advice fits
    assert ev.n == m


def test_kernel_refused_even_at_one_position_names_the_token_limit(tiny, monkeypatch):
    _limit(monkeypatch, 1024)                                                  # 1 KB
    with pytest.raises(KernelMemoryError, match="free memory|token limit"):
        compute_prompt_kernel(tiny, PROMPT, "q", max_positions=64)


def test_exact_route_and_fewshot_are_guarded(tiny, monkeypatch):
    _limit(monkeypatch, 1024)
    with pytest.raises(KernelMemoryError):
        compute_prompt_kernel(tiny, PROMPT, "mlp_up", max_positions=16, qttt=False)
    fs = FewShotPrompt(demos=[("1", "2"), ("3", "4"), ("5", "6")], query_x="7")
    with pytest.raises(KernelMemoryError, match="fewer demonstrations"):
        compute_prompt_kernel(tiny, fs, "v")


def test_generous_limit_runs(tiny, monkeypatch):
    _limit(monkeypatch, 64 << 30)
    ev = compute_prompt_kernel(tiny, PROMPT, "q", max_positions=64)
    assert ev.n == 64
    run = QTTTRun(tiny, PROMPT, QTTTConfig(steps=2, span=16, lr=1e-3))
    run.prepare()
    assert len(run.run_to_end()) == 2


def test_qttt_refused_with_a_shorter_span(tiny, monkeypatch):
    from ttt_core.qttt import qttt_inputs

    T = int(qttt_inputs(tiny, PROMPT).ids.shape[1])
    small, big = mg.qttt_estimate(tiny, T, 4).total, mg.qttt_estimate(tiny, T, 200).total
    assert small < big
    _limit(monkeypatch, (small + big) / 2)
    run = QTTTRun(tiny, PROMPT, QTTTConfig(steps=2, span=200))
    with pytest.raises(mg.MemoryBudgetError, match="span ≤") as info:
        run.prepare()
    k = int(re.search(r"span ≤ ([\d,]+)", str(info.value)).group(1).replace(",", ""))
    assert 4 <= k < 200
    run = QTTTRun(tiny, PROMPT, QTTTConfig(steps=2, span=k))                   # the advice fits
    run.prepare()
    assert len(run.run_to_end()) == 2


def test_paper_gd_advice_names_layers(tiny):
    adv = mg.paper_gd_advice(tiny, [40] * 6, 0, "v")
    full = mg.paper_gd_estimate(tiny, [40] * 6, 0).total
    one = mg.paper_gd_estimate(tiny, [40] * 6, tiny.adapter.n_layers - 1).total
    assert one < full
    assert re.search(r"last \d+ layer", adv((one + full) // 2))
    assert "fewer demonstrations" in adv(one // 2)


# ------------------------------------------------------------------ real out-of-memory


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:118] "
                                                             "DefaultCPUAllocator: can't allocate memory: you tried "
                                                             "to allocate 123 bytes.")])
def test_oom_in_kernel_becomes_clear_error(tiny, monkeypatch, exc):
    import ttt_core.prompt_kernel as pk

    refs = []

    def boom(*a, **k):
        big = torch.zeros(1000)          # a frame local the error must not keep alive
        refs.append(weakref.ref(big))
        raise exc

    monkeypatch.setattr(pk, "frozen_kv_route", boom)
    monkeypatch.delenv(mg.ENV_LIMIT, raising=False)
    with pytest.raises(KernelMemoryError, match="Ran out of memory.*max_positions") as info:
        compute_prompt_kernel(tiny, PROMPT, "q", max_positions=32)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    gc.collect()
    assert refs and refs[0]() is None    # the failed computation's tensors are freed


def test_oom_in_qttt_step_becomes_clear_error(tiny, monkeypatch):
    import ttt_core.qttt as q

    def boom(*a, **k):
        raise MemoryError()

    run = QTTTRun(tiny, PROMPT, QTTTConfig(steps=2, span=16))
    run.prepare()
    monkeypatch.setattr(q, "span_loss_and_grads", boom)
    with pytest.raises(mg.MemoryBudgetError, match="Ran out of memory during the qTTT run.*span"):
        run.run_to_end()


def test_other_errors_pass_through(tiny, monkeypatch):
    import ttt_core.prompt_kernel as pk

    monkeypatch.setattr(pk, "frozen_kv_route", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        compute_prompt_kernel(tiny, PROMPT, "q", max_positions=32)


# ------------------------------------------------------------------ paper GD and the experiments


def _paper_prompt():
    from ttt_core.experiments.paper_tasks import paper_task

    return paper_task(5, 0).prompt


def test_paper_gd_refused_before_it_builds_anything(tiny, monkeypatch):
    from ttt_core.paper_gd import PaperConfig, PaperRun

    _limit(monkeypatch, 1024)
    run = PaperRun(tiny, _paper_prompt(), PaperConfig(steps=2, rho=0.01, kind="v"))
    with pytest.raises(mg.MemoryBudgetError, match="fewer demonstrations|fewer layers|last \\d+ layer"):
        run.prepare()
    assert not hasattr(run, "batch")


def test_oom_in_a_paper_gd_step_becomes_clear_error(tiny, monkeypatch):
    import ttt_core.paper_gd as pg

    run = pg.PaperRun(tiny, _paper_prompt(), pg.PaperConfig(steps=2, rho=0.01, kind="v"))
    run.prepare()

    def boom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")

    monkeypatch.setattr(run.batch, "logits", boom)
    with pytest.raises(mg.MemoryBudgetError, match="Ran out of memory during the paper-mode GD"):
        run.run_to_end()


def test_a_reproduction_task_that_does_not_fit_is_reported_not_raised(tiny, monkeypatch):
    from ttt_core.experiments.paper_tasks import ReproSettings
    from ttt_core.experiments.reproduce import _job

    _limit(monkeypatch, 1024)
    s = ReproSettings(model="tiny-random-llama", tasks=1, grid_max=2, fixed_T=1, exp2="off", last_layers=1)
    res = _job(tiny, ("task", 0, s.to_dict(), 0.1))
    assert "memory" in res["error"].lower() and "MB" in res["error"]
