"""tools/benchmark.py: a --quick run at a tiny size writes a well-formed report whose agreement
checks pass; sections merge; bad options are one-line errors. No timing assertions."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

from models.local_prototypes import official_cell_loop

ROOT = Path(__file__).resolve().parents[1]
benchmark = load_script("benchmark")   # tools/benchmark.py


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "BENCH.md"
    done = subprocess.run([sys.executable, "tools/benchmark.py", "--quick", "--size", "64", "--out",
                           str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # nothing on stderr before the first progress line (the process contract of the one-line errors below)
    assert done.stderr.startswith("benchmark ["), done.stderr[:2000]
    return out.read_text()


def test_quick_report_has_every_section_and_the_machine(report):
    for heading in ("## CPU (quick run)", "### Targets", "### 1. Head forward per episode",
                    "### 2. Head time",
                    "### 3. Scaling", "### 4. Training throughput", "### 5. Volumetric inference",
                    "### 6. Peak memory", "## GPU"):
        assert heading in report, heading
    assert "Command: `python tools/benchmark.py --quick --size 64 --out " in report
    assert f"| torch | {torch.__version__} |" in report
    assert re.search(r"\| cpu \| .+ \|", report) and re.search(r"\| cores \| \d+ \|", report)
    assert "Not measured yet" in report.split("<!-- begin gpu -->")[1]   # no GPU figures invented
    for encoder in benchmark.ENCODER_SHAPES:
        assert f"| {encoder} |" in report
    assert "| demo | cnn_small" in report
    assert "Measured in full runs only" in report.split("### 6.")[1]     # no fresh process in a quick run


def test_quick_report_has_the_step_against_the_peak(report):
    """Section 7: a peak per dtype, and each demo method's step with its FLOP/s, share of the peak and
    phases (the encoder phase absent for SENet, which has none)."""
    section = report.split("### 7. The demo's training step against the machine's peak")[1]
    peaks = re.findall(r"^\| (float32|bfloat16) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", section, re.M)
    assert [p[0] for p in peaks] == ["float32", "bfloat16"]
    assert all(float(p[3]) == max(float(p[1]), float(p[2])) > 0 for p in peaks)
    steps = {r[0]: r for r in re.findall(r"^\| (PANet|SENet|LSLPN) \| (\d+), (\d+) \| .+? \| ([0-9.]+) \| "
                                          r"([0-9.]+) \((\d+)%\) \| ([0-9.]+) \((\d+)%\) \| (\d+)% \|(.*)$",
                                          section, re.M)}
    assert set(steps) == {"PANet", "SENet", "LSLPN"}
    assert steps["LSLPN"][1] == "64" and steps["SENet"][1] == "64"
    for method, r in steps.items():
        assert float(r[3]) > 0 and float(r[4]) > 0 and float(r[6]) > 0
        phases = [cell.strip() for cell in r[9].strip(" |").split("|")]
        assert len(phases) == len(benchmark.PHASES)
        assert (phases[1] == "-") == (method == "SENet")
    assert "Candidates side by side: full runs only." in section


def test_candidates_render_their_speed_up_against_the_first(monkeypatch):
    """The candidates table divides the first candidate's step by each one's, per method."""
    names = list(benchmark.CANDIDATES)
    profile = {"seconds": 0.2, "kernels": "AVX2"}
    results = {"peak": [{"dtype": "float32", "matmul": 1e11, "conv": 2e11, "peak": 2e11, "matmul_n": 8,
                         "conv_shape": [1, 2, 3, 3]}], "step": {},
               "candidates": {name: {m: dict(profile) for m in benchmark.STEP_METHODS} for name in names}}
    results["candidates"][names[1]]["LSLPN"]["seconds"] = 0.1
    lines = benchmark.render_step(results, benchmark.Plan(False, 64))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    assert rows[names[1]].split(" | ")[3] == "0.100 (2.00x)" and "0.200 (1.00x)" in rows[names[0]]
    assert rows["float32"] == "| float32 | 100.0 | 200.0 | 200.0 |"


def test_quick_report_agreement_checks_pass(report):
    image = re.search(r"reference vs 'image': max \|logit difference\| = ([0-9.e+-]+) .*: (PASS|FAIL)",
                      report)
    feature = re.search(r"reference vs 'feature': argmax agreement = ([0-9.]+)% .*: (PASS|FAIL)", report)
    assert image and feature
    assert float(image.group(1)) <= benchmark.IMAGE_TOLERANCE and image.group(2) == "PASS"
    assert float(feature.group(1)) >= 100 * benchmark.FEATURE_AGREEMENT and feature.group(2) == "PASS"


def test_quick_report_numbers_are_measured(report):
    """Every timing table row carries positive numbers (no placeholders)."""
    speedups = re.findall(r"\| ([0-9.]+)x \|$", report, re.M)
    assert len(speedups) == 3 and all(float(v) > 0 for v in speedups)
    scaling = re.findall(r"^\| (image|feature) \| (\d+) \| (\d+) \| (\d+) \| ([0-9.]+) \| (\d+) \|$", report,
                         re.M)
    assert {int(row[1]) for row in scaling} == {16, 32, 64}
    assert all(float(row[4]) > 0 for row in scaling)
    assert ("image", "64", "8", "225") in {row[:4] for row in scaling}


def test_head_comparison_detects_a_wrong_head():
    """The checks can fail: a reference that disagrees with the head makes both checks FAIL."""
    def wrong(*args, **kwargs):
        logits = official_cell_loop(*args, **kwargs)
        return logits.flip(-1)
    result = benchmark.head_comparison(wrong, 64, 16, 8, 4, torch.device("cpu"), repeats=1,
                                       reference_repeats=1)
    assert not result["image_ok"] and not result["feature_ok"]
    good = benchmark.head_comparison(official_cell_loop, 64, 16, 8, 4, torch.device("cpu"), repeats=1,
                                 reference_repeats=1)
    assert good["image_ok"] and good["feature_ok"] and good["max_abs_diff_image"] < 1e-4


def test_merge_keeps_the_other_section():
    first = benchmark.merge(None, "cpu", "## CPU\n\ncpu figures\n")
    assert "cpu figures" in first and "Not measured yet" in first
    both = benchmark.merge(first, "gpu", "## GPU\n\ngpu figures\n")
    assert "cpu figures" in both and "gpu figures" in both and "Not measured yet" not in both
    again = benchmark.merge(both + "\n## Notes\nkept\n", "cpu", "## CPU\n\nnew cpu figures\n")
    assert "new cpu figures" in again and "gpu figures" in again and again.count("## CPU") == 1
    assert again.endswith("<!-- end gpu -->\n\n## Notes\nkept\n")          # notes after the sections stay


def test_near_boundary_band():
    labels = torch.zeros(1, 1, 10, 10, dtype=torch.long)
    labels[..., :, 5:] = 1
    band = benchmark.near_boundary(labels, 2)[0, 0]
    assert band[:, 3:7].all() and not band[:, :3].any() and not band[:, 7:].any()  # columns 4 | 5


def test_measure_reports_the_median_of_timed_runs():
    calls = []
    measured = benchmark.measure(lambda: calls.append(1), torch.device("cpu"), repeats=3, warmup=2)
    assert len(calls) == 5 and len(measured.runs) == 3 and measured.warmup == 2
    assert sorted(measured.runs)[1] == measured.median


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")


@pytest.mark.parametrize("argv, words", [
    (["--size", "60", "--out", "x.md"], "--size 60"),
    (["--device", "tpu", "--out", "x.md"], "--device 'tpu'"),
    pytest.param(["--device", "cuda", "--out", "x.md"], "no CUDA GPU", marks=NO_GPU),
    (["--quick", "--out", "absent/x.md"], "does not exist"),      # before minutes of measuring
    (["--quick", "--out", "tools"], "is a folder")])
def test_bad_options_are_one_line_errors(argv, words, capsys, monkeypatch):
    """In-process through run_cli, as `python tools/benchmark.py` runs main (the `report` fixture runs the
    real process and checks that its imports print nothing on stderr)."""
    from util.cli import run_cli
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(benchmark.main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and words in lines[0] and lines[0].startswith("error:")
    assert not (ROOT / "x.md").exists()


def test_compile_unavailable_falls_back_in_one_logged_line(monkeypatch, caplog):
    from util.device import say_once

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")
    monkeypatch.setattr(torch, "compile", broken)
    model = torch.nn.Linear(2, 2)
    say_once.cache_clear()
    with caplog.at_level("WARNING", logger="lslpn"):
        assert benchmark.compiled(model) is model and benchmark.compiled(model) is model
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile unavailable here (RuntimeError): eager mode"]
    say_once.cache_clear()
