"""End-to-end: one server, several browser sessions at once (GitHub issue 15, point 1).

Two sessions run Live qTTT on the shared SmolLM2 while two other sessions open Spectrum & SNR on
the same (default) prompt. The readers' numbers — λ⋆, P(TTT beats ICL), effective rank, as the
page's st.metric values, plus the two captions under them that quote λ⋆'s interval and the query's
value with more digits — must equal a solo session's before, during and after the runs; both runs
must finish; a brand-new session afterwards must see the same numbers; and the shared model's
weights must be bit-identical afterwards (the Home model card's sha256 fingerprint, read before
and after). Every reading is taken in a fresh Streamlit session (a new tab), so it is a new
computation, never a session cache hit.

Model: the embedded SmolLM2, the app's real default, because the point is that real adaptation
runs (real W_Q deltas, real frozen-KV prefill, real attention kernels) on the one shared model do
not leak into other sessions; on a tiny random model the runs are over before a reader has
started. Sized for a loaded 2-core machine: k = 16 keeps a step cheap, and 64 steps keep both runs
going until well after the readers' "during" numbers are in (checked, not assumed: measured, the
readers were done at about step 25 of 64, so the margin is ~2.5×; the ratio holds under load because
runs and readers slow down together). The test takes ~3.5 min, most of it the two runs.

Printed (run pytest with -s to see them; also in artifacts/e2e_concurrent.txt): the wall time,
each run's own time, and how long a new session waits for its first page (Home's model card)
alone and while two runs go. Screenshot of the four concurrent sessions: artifacts/e2e_concurrent.png."""

from __future__ import annotations

import os
import re
import time

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import ARTIFACTS

pytestmark = [pytest.mark.e2e, pytest.mark.smollm2,
              # in CI by default (about 3 min on 2 cores; passed 6 runs by hand before it was switched on);
              # TTT_LENS_E2E_CONCURRENT=0 skips it for a quick local run of the browser suite
              pytest.mark.skipif(os.environ.get("TTT_LENS_E2E_CONCURRENT") == "0",
                                 reason="TTT_LENS_E2E_CONCURRENT=0 skips the 5-session concurrency test")]

STEPS = 64          # qTTT steps per run: long enough that both runs outlast the readers' "during" page
SPAN = 16           # span length k: a few tokens per step keeps one step cheap
RUN_TIMEOUT = 600_000
LABELS = {"lam": "λ⋆ = σ²/τ²", "prob": "P(TTT beats ICL at T=8)", "rank": "Effective rank"}
CAPTIONS = {"posterior": "λ⋆ posterior median", "route": "Route:"}   # more digits: interval, ML point, query
VIEWPORT = {"width": 1400, "height": 1000}


def first_page(page, app_url: str) -> float:
    """Open Home in this tab; seconds until the model card (with its fingerprint) is shown."""
    t0 = time.perf_counter()
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_text("Weights fingerprint:").first.wait_for(timeout=300_000)
    return time.perf_counter() - t0


def fingerprint(page) -> str:
    text = page.get_by_text("Weights fingerprint:").first.inner_text()
    return re.search(r"\b[0-9a-f]{12}\b", text).group(0)


def open_spectrum(page) -> None:
    page.get_by_role("textbox", name="Prompt", exact=True).wait_for(timeout=120_000)
    page.get_by_role("link", name="Spectrum & SNR").first.click()


def spectrum_numbers(page) -> dict[str, str]:
    """The three st.metric values, once the page has computed them (a fresh session shows none
    before its own computation is done), and the two captions under them that quote λ⋆'s interval,
    its maximum-likelihood value and the query's value and error with more digits."""
    out = {}
    for key, label in LABELS.items():
        m = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
        m.wait_for(timeout=420_000)
        out[key] = m.locator('[data-testid="stMetricValue"]').inner_text().strip()
    for key, start in CAPTIONS.items():
        cap = page.get_by_text(start).first
        cap.wait_for(timeout=120_000)
        out[key] = cap.inner_text().strip()
    return out


def fresh_tab(context):
    """A new tab in `context`: a new Streamlit session (the session lives in the tab)."""
    for old in context.pages:
        old.close()
    return context.new_page()


def start_run(page) -> None:
    page.get_by_role("button", name="Run", exact=True).click()


def run_state(page) -> str:
    """'finished', 'running at step i' (the page's own progress message) or 'other'."""
    if page.get_by_text(f"Finished {STEPS} steps").filter(has_text="(qttt").count():
        return "finished"
    status = page.get_by_text(re.compile(r"Running… step \d+ of \d+"))
    if status.count():
        return "running at step " + re.search(r"step (\d+)", status.first.inner_text()).group(1)
    return "other"


def read_readers(readers, app_url: str) -> tuple[list[dict[str, str]], list[float]]:
    """A fresh tab per reader context, all opened before any is waited on (so they compute at the
    same time); returns each reader's numbers and its first-page wait."""
    tabs = [fresh_tab(ctx) for ctx in readers]
    t0 = [time.perf_counter() for _ in tabs]
    for tab in tabs:
        tab.goto(app_url, wait_until="domcontentloaded")
    waits = []
    for tab, t in zip(tabs, t0):
        tab.get_by_text("Weights fingerprint:").first.wait_for(timeout=300_000)
        waits.append(time.perf_counter() - t)
    for tab in tabs:
        open_spectrum(tab)
    return [spectrum_numbers(tab) for tab in tabs], waits


def test_two_live_runs_and_two_spectrum_readers_share_one_server(app_url, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    contexts = {name: browser.new_context(viewport=VIEWPORT) for name in ("solo", "run1", "run2", "read1", "read2")}
    report: list[str] = []
    try:
        # ---- a solo session: the reference numbers and the fingerprint before anything runs
        solo = contexts["solo"].new_page()
        wait_solo = first_page(solo, app_url)
        fp_before = fingerprint(solo)
        open_spectrum(solo)
        t0 = time.perf_counter()
        reference = spectrum_numbers(solo)
        t_spectrum_solo = time.perf_counter() - t0
        assert all(reference.values()), reference

        # ---- before the runs: both readers, at the same time
        readers = [contexts["read1"], contexts["read2"]]
        before, waits_before = read_readers(readers, app_url)
        assert before == [reference, reference], (reference, before)

        # ---- two runners: Live qTTT (qTTT mode, the default), STEPS steps on spans of SPAN tokens,
        # opened by a link that carries the settings (they are bound widgets)
        runners = [contexts["run1"].new_page(), contexts["run2"].new_page()]
        for r in runners:
            r.goto(f"{app_url}/live_qttt?qttt_steps={STEPS}&qttt_span={SPAN}", wait_until="domcontentloaded")
        for i, r in enumerate(runners):
            r.get_by_role("button", name="Run", exact=True).wait_for(timeout=180_000)
            # the link's values, as the page shows them once its first run is drawn: under load the
            # Run button of a first render can show before the bound inputs have taken the URL's
            # values (seen once in CI: Steps 64, Span still at its default 128), so each input gets
            # up to 60 s to show its value; one that never does fails here, with a screenshot
            try:
                for name, value in (("Steps N", STEPS), ("Span length k", SPAN)):
                    expect(r.get_by_role("spinbutton", name=name, exact=True)).to_have_value(str(value),
                                                                                          timeout=60_000)
            except AssertionError:
                r.screenshot(path=str(ARTIFACTS / f"e2e_concurrent_link_{i}.png"), full_page=True)
                raise
        for r in runners:
            start_run(r)
        for r in runners:
            r.get_by_text("Running… step").first.wait_for(timeout=300_000)
        t_runs_started = time.perf_counter()

        # ---- during the runs: both readers again, in new sessions
        during, waits_during = read_readers(readers, app_url)
        states = [run_state(r) for r in runners]
        t_during = time.perf_counter() - t_runs_started
        assert all(state.startswith("running") for state in states), (
            f"a run finished before the readers' numbers appeared ({states}): raise STEPS so the check "
            "really happens during the runs")
        assert during == [reference, reference], (reference, during)
        # what the four concurrent sessions look like at this moment
        shots = []
        for i, pg in enumerate(runners + [ctx.pages[0] for ctx in readers]):
            path = ARTIFACTS / f"e2e_concurrent_{i}.png"
            pg.screenshot(path=str(path))
            shots.append(path)
        _tile(shots, ARTIFACTS / "e2e_concurrent.png")

        # ---- both runs finish
        run_seconds = []
        for r in runners:
            done = r.get_by_text(f"Finished {STEPS} steps").filter(has_text="(qttt")
            done.first.wait_for(timeout=RUN_TIMEOUT)
            run_seconds.append(float(re.search(r"in ([\d.]+) s", done.first.inner_text()).group(1)))
        t_runs_done = time.perf_counter()

        # ---- after the runs: the readers, then a brand-new session (own context), and the weights
        after, _ = read_readers(readers, app_url)
        assert after == [reference, reference], (reference, after)
        newcomer_ctx = browser.new_context(viewport=VIEWPORT)
        try:
            newcomer = newcomer_ctx.new_page()
            wait_after = first_page(newcomer, app_url)
            fp_after = fingerprint(newcomer)
            open_spectrum(newcomer)
            assert spectrum_numbers(newcomer) == reference
        finally:
            newcomer_ctx.close()
        assert fp_after == fp_before, f"the shared model's weights changed: {fp_before} → {fp_after}"

        wall = time.perf_counter() - t_start
        report += [
            f"reference numbers (solo): {reference}; weights fingerprint {fp_before} before and after",
            f"wall time of the test: {wall:.1f} s",
            f"solo Spectrum & SNR computation: {t_spectrum_solo:.1f} s",
            f"runs ({STEPS} qTTT steps, k = {SPAN}): {run_seconds[0]:.1f} s and {run_seconds[1]:.1f} s by their own "
            f"messages; both started to both finished {t_runs_done - t_runs_started:.1f} s",
            f"new session, first page (Home model card, with its fingerprint): first session of the server "
            f"(loads the model) {wait_solo:.1f} s; two new sessions at once, no run: {waits_before[0]:.1f} s and "
            f"{waits_before[1]:.1f} s; two new sessions at once while two runs go: {waits_during[0]:.1f} s and "
            f"{waits_during[1]:.1f} s; one new session after the runs: {wait_after:.1f} s",
            f"when the readers' 'during' numbers were in, the runs were {states[0]} and {states[1]} of {STEPS} "
            f"({t_during:.1f} s after both had started)",
        ]
    finally:
        for ctx in contexts.values():
            ctx.close()
        if report:
            (ARTIFACTS / "e2e_concurrent.txt").write_text("\n".join(report) + "\n")
            print("\n" + "\n".join(report))


def _tile(paths, out) -> None:
    """Two by two: the two runners on top, the two readers below, each at half size."""
    from PIL import Image

    imgs = [Image.open(p) for p in paths]
    w, h = imgs[0].width // 2, imgs[0].height // 2
    sheet = Image.new("RGB", (2 * w, 2 * h), "white")
    for i, im in enumerate(imgs):
        sheet.paste(im.resize((w, h)), ((i % 2) * w, (i // 2) * h))
    sheet.save(out)
    for p in paths:
        p.unlink()
