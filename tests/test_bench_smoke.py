"""The core benchmark's comparisons run end to end on a tiny problem and measure what they claim.

Only correctness is checked here (the NLL yardstick, the reference optimum, ECE agreement, the README
section rewrite); timings are the benchmark's business, never a test's.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import log_loss

from tests.helpers.numerics import EPS32
from tests.helpers.requirements import require_or_skip
from tests.helpers.triton import triton_unavailable_reason

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench_core() -> ModuleType:
    # bench/ is a folder of scripts, not a package: load bench_core.py the way `python bench/...` runs it
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_core", BENCH / "bench_core.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_core"] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture(scope="module")
def case(bench_core: ModuleType):
    return bench_core.make_case(2_000, 5, seed=3, name="2k_x_5")


@pytest.fixture(scope="module")
def fit_result(bench_core: ModuleType, case):
    return bench_core.compare_fit(case, quick=True)


def test_exact_nll_matches_scikit_learn_log_loss(bench_core: ModuleType, case) -> None:
    temperature = 2.7
    probabilities = softmax(case.logits.astype(np.float64) / temperature, axis=1)
    expected = log_loss(case.labels, probabilities, labels=np.arange(5))
    assert bench_core.exact_nll(case.logits, case.labels, temperature) == pytest.approx(expected, abs=1e-12)


def test_reference_is_the_minimum_and_near_the_generating_temperature(bench_core: ModuleType, fit_result):
    reference = fit_result.reference
    # the generator's logits are three times too sharp (see make_case); 2,000 rows pin T to about +-0.3
    assert reference.temperature == pytest.approx(3.0, abs=0.3)
    for outcome in fit_result.outcomes.values():
        assert outcome.nll >= reference.nll - 1e-12
    for step in (0.999, 1.001):
        nearby = bench_core.exact_nll(
            fit_result.case.logits, fit_result.case.labels, reference.temperature * step
        )
        assert nearby > reference.nll


def test_fit_comparison_reports_each_competitors_optimum(fit_result) -> None:
    outcomes, reference = fit_result.outcomes, fit_result.reference
    assert outcomes["ours"].gap(reference) <= 1e-9
    assert outcomes["sklearn_core"].gap(reference) <= 1e-6
    # the public scikit-learn route fits the very calibrator timed as "core"
    assert outcomes["sklearn_public"].temperature == outcomes["sklearn_core"].temperature
    # the LBFGS recipe (lr=0.01 from T=1.5) stops short of T near 3: the gap column can tell them apart
    assert outcomes["lbfgs"].temperature < 2.5
    assert outcomes["lbfgs"].gap(reference) > 1e-4
    for outcome in outcomes.values():
        assert len(outcome.samples.seconds) == 1


def test_ece_implementations_agree(bench_core: ModuleType, case) -> None:
    values = bench_core.compare_ece(case, quick=True).values
    assert 0.2 < values["ours"] < 1.0  # three times too sharp: far from calibrated
    assert values["bin_loop"] == pytest.approx(values["ours"], abs=1e-6)
    # torchmetrics sums float32 confidences in float32: a few EPS32 at N = 2,000 (see tests/core/test_metrics.py)
    assert values["torchmetrics"] == pytest.approx(values["ours"], abs=32 * EPS32)


def test_render_lists_every_case_and_target(bench_core: ModuleType, case, fit_result) -> None:
    ece = bench_core.compare_ece(case, quick=True)
    text = bench_core.render([fit_result], [ece], {"nproc": "2"}, "python bench/bench_core.py", 1.0, 10.0)
    assert text.startswith("## Numerical core")
    assert text.count("| 2,000 x 5 |") == 3  # fit time, fit optimum, ECE
    assert "ref" in text and "torchmetrics" in text


def test_replace_section_keeps_other_sections(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from _timing import replace_section
    finally:
        sys.path.remove(str(BENCH))
    readme = tmp_path / "README.md"
    replace_section(readme, "one", "first body", intro="# Benchmarks\n")
    replace_section(readme, "two", "other body")
    replace_section(readme, "one", "new body")
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "<!-- one:start -->\nnew body\n<!-- one:end -->" in text
    assert "<!-- two:start -->\nother body\n<!-- two:end -->" in text
    assert "first body" not in text
    assert text.index("one:start") < text.index("two:start")


def test_batching_bench_runs_and_writes_its_table(tmp_path: Path) -> None:
    # two real servers (batching off and on), one short window per cell; only the table's shape is checked
    readme = tmp_path / "README.md"
    command = [sys.executable, str(BENCH / "bench_batching.py"), "--rounds", "1", "--window", "0.2"]
    command += ["--concurrency", "1", "2", "--max-requests", "200", "--write", "--readme", str(readme)]
    subprocess.run(command, check=True, capture_output=True, timeout=240)
    text = readme.read_text()
    assert "<!-- bench_batching:start -->\n## Dynamic batching of /predict" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1-row ")]
    assert len(rows) == 4  # JSON and .npy at concurrency 1 and 2
    assert "not accounted for" not in text  # the batch histogram saw every request
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[-1] == "0 / 0"  # no request failed on either server
        if cells[1] == "1":  # one request at a time: every forward pass serves exactly one
            assert cells[-2] == "1.00"


def test_fit_document_bench_runs_and_writes_its_table(tmp_path: Path) -> None:
    # tiny sizes, short budget: only that it runs, agrees on T and writes its section is checked
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    command = [sys.executable, str(BENCH / "bench_fit_document.py"), "--sizes", "2000x5", "300x1000"]
    command += ["--budget", "0.1", "--write", "--readme", str(readme)]
    subprocess.run(command, check=True, capture_output=True, timeout=240)
    text = readme.read_text()
    assert "<!-- other:start -->\nkept\n<!-- other:end -->" in text
    assert "<!-- bench_fit_document:start -->\n## Fit document cost" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 2,000 x 5 ", "| 300 x 1000 "))]
    assert len(rows) == 2
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[4].endswith("x")  # document / fit


def test_labelled_bench_runs_against_a_real_server_and_writes_its_table(tmp_path: Path) -> None:
    # tiny sizes: only that the in-process route, the real server and the client agree and a table is written
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n")
    command = [sys.executable, str(BENCH / "bench_labelled.py"), "--fit-rows", "2000", "--eval-rows", "300"]
    command += ["--eval-classes", "20", "--budget", "0.1", "--write", "--readme", str(readme)]
    subprocess.run(command, check=True, capture_output=True, timeout=240)
    text = readme.read_text()
    assert "<!-- bench_labelled:start -->\n## Large labelled sets over HTTP" in text
    assert "the route's temperature equals the core fit's: True" in text
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 6  # header and 5 rows


def run_bench(script: str, *arguments: str, timeout: float = 300) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *arguments], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]


def require_triton() -> None:
    reason = triton_unavailable_reason()
    if reason is not None:
        require_or_skip(reason)


def test_proxy_bench_runs_through_triton_and_writes_its_table(tmp_path: Path) -> None:
    # a real Triton and a real proxy, one short window pair per cell: only that every cell ran both sides
    # without errors (each checked one calibrated answer first) and the section is written
    require_triton()
    readme, figures = tmp_path / "README.md", tmp_path / "figures.json"
    readme.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    run_bench(
        "bench_proxy.py",
        *("--seconds", "0.2", "--rounds", "2", "--concurrency", "2", "--sizes", "1x10", "2x1000"),
        *("--write", "--readme", str(readme), "--json", str(figures)),
    )
    text = readme.read_text()
    assert "<!-- other:start -->\nkept\n<!-- other:end -->" in text
    assert "<!-- bench_proxy:start -->\n## Calibrating proxy in front of Triton" in text
    document = json.loads(figures.read_text())
    # labels drawn at T = 2 from 2,000 rows
    assert all(1.5 < temperature < 2.7 for temperature in document["temperatures"].values())
    cells = document["cells"]
    assert [(cell["size"], cell["encoding"]) for cell in cells] == [
        ("1 x 10", "JSON"),
        ("1 x 10", "binary"),
        ("2 x 1000", "JSON"),
        ("2 x 1000", "binary"),
    ]
    for cell in cells:
        for side in ("direct", "proxy"):
            assert cell[side]["requests"] > 0 and cell[side]["errors"] == 0, cell
    rows = [line for line in text.splitlines() if line.startswith(("| 1 x 10 ", "| 2 x 1000 "))]
    assert len(rows) == 8  # the speed table and the CPU table


def test_upstream_client_bench_checks_both_clients_answers_and_writes_its_table(tmp_path: Path) -> None:
    require_triton()
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n")
    run_bench("bench_upstream_client.py", "--calls", "3", "--rounds", "2", "--write", "--readme", str(readme))
    text = readme.read_text()
    assert "<!-- bench_upstream_client:start -->\n## The proxy's upstream transport" in text
    assert len([line for line in text.splitlines() if line.startswith(("| 1 x 10 ", "| 64 x 1000 "))]) == 2


def test_grpc_bench_runs_every_side_and_writes_its_table(tmp_path: Path) -> None:
    # calibserve over gRPC and HTTP and Triton over gRPC, one short window per side and cell: only that every
    # cell ran every side without errors (each checked one answer first) and the section is written
    require_triton()
    readme, figures = tmp_path / "README.md", tmp_path / "figures.json"
    readme.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    run_bench(
        "bench_grpc.py",
        *("--seconds", "0.2", "--rounds", "1", "--concurrency", "2", "--sizes", "1x10", "2x1000"),
        *("--write", "--readme", str(readme), "--json", str(figures)),
    )
    text = readme.read_text()
    assert "<!-- other:start -->\nkept\n<!-- other:end -->" in text
    assert "<!-- bench_grpc:start -->\n## Open Inference Protocol over gRPC" in text
    cells = json.loads(figures.read_text())["cells"]
    assert [cell["size"] for cell in cells] == ["1 x 10", "2 x 1000"]
    for cell in cells:
        for side in ("calibserve gRPC", "calibserve HTTP binary", "Triton gRPC"):
            assert cell[side]["requests"] > 0 and cell[side]["errors"] == 0, cell


def test_footprint_bench_starts_each_deployment_and_writes_its_table(tmp_path: Path) -> None:
    # one start of each deployment; only that each served its requests and which of them mapped torch
    require_triton()
    readme, figures = tmp_path / "README.md", tmp_path / "figures.json"
    run_bench("bench_footprint.py", "--runs", "1", "--write", "--readme", str(readme), "--json", str(figures))
    assert "<!-- bench_footprint:start -->\n## Cold start and memory" in readme.read_text()
    deployments = json.loads(figures.read_text())["deployments"]
    assert set(deployments) == {"logits-only", "proxy", "torchscript"}
    assert deployments["logits-only"]["torch_loaded"] == [False]
    assert deployments["proxy"]["torch_loaded"] == [False]
    assert deployments["torchscript"]["torch_loaded"] == [True]
    assert deployments["logits-only"]["torch_after_fits"] == [True]  # a temperature fit imports torch
    for entry in deployments.values():
        assert entry["runs"] == 1
        assert entry["ready_s"]["median"] <= entry["loaded_s"]["median"]


def test_monitoring_bench_runs_every_part_and_writes_its_section(tmp_path: Path) -> None:
    # real servers, tiny sizes, one short round: only that every part ran, every answer was right (the bench
    # checks each outcome was counted and each status) and the section is written; no timing is checked
    readme, figures = tmp_path / "README.md", tmp_path / "figures.json"
    readme.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    run_bench(
        "bench_monitoring.py",
        *("--rows", "2000", "--models", "20", "--seconds", "0.3", "--rounds", "1", "--batches", "1", "100"),
        *("--max-rows", "1000", "--queries", "5", "--scrapes", "2", "--scrape-gap", "0", "--workers", "2"),
        *("--write", "--readme", str(readme), "--json", str(figures)),
        timeout=600,
    )
    text = readme.read_text()
    assert "<!-- other:start -->\nkept\n<!-- other:end -->" in text
    assert "<!-- bench_monitoring:start -->\n## Live monitoring" in text
    document = json.loads(figures.read_text())
    cells = document["ingest"]["cells"]
    assert [cell["batch"] for cell in cells] == [1, 100]
    for cell in cells:
        for case in ("by id", "by logits", "/v1/metrics"):
            assert cell[case]["calls"] >= 1 and cell[case]["rows_per_s"] > 0, cell
    overhead = document["overhead"]
    for side in ("off", "on"):
        assert overhead[side]["requests"] > 0 and overhead[side]["errors"] == 0, overhead
    query = document["query"]
    assert query["fill"]["rows"] == 2000
    assert query["window_predictions"] == 2000  # every logged row is in the 7-day window
    assert query["window_outcomes"] == query["fill"]["outcomes"] > 0
    assert query["bytes_per_row"] > 0
    configurations = document["metrics"]["configurations"]
    assert len(configurations) == 3
    for record in configurations.values():
        assert len(record["bytes"]) == 2
        assert record["parts"]["gauge_models"] == 2  # only calibrated models are exported: the fitted tenth
        assert record["parts"]["gauge_models_with_outcomes"] == 2  # the fitted tenth


def test_methods_bench_scores_every_method_and_shows_what_the_floors_change(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    run_bench(
        "bench_methods.py",
        "--repeats",
        "1",
        "--sets",
        "kumar_vgg16_c10.npz",
        "--write",
        "--readme",
        str(readme),
    )
    text = readme.read_text()
    assert "<!-- bench_methods:start -->\n## Which method where" in text
    rows = {
        line.split(" | ")[1]: line.split(" | ") for line in text.splitlines() if line.startswith("| kumar")
    }
    assert set(rows) >= {"uncalibrated", "temperature", "vector", "matrix", "isotonic", "histogram"}
    assert rows["isotonic, floor 0"][2] == "inf" and rows["isotonic"][2] != "inf"
    assert float(rows["temperature"][2]) < float(rows["uncalibrated"][2])


def test_store_bench_runs_and_writes_its_section(tmp_path: Path) -> None:
    # moto in the bench process, three real servers, a handful of each operation: only the section's shape
    readme = tmp_path / "README.md"
    command = [sys.executable, str(BENCH / "bench_store.py"), "--fits", "2", "--requests", "40"]
    command += ["--propagation-fits", "2", "--refresh", "0.2", "--down-seconds", "0.5"]
    command += ["--write", "--readme", str(readme)]
    subprocess.run(command, check=True, capture_output=True, timeout=240)
    text = readme.read_text()
    assert "<!-- bench_store:start -->\n## S3 store (`bench/bench_store.py`)" in text
    assert len([line for line in text.splitlines() if line.startswith("| calibrate 1 x 10 |")]) == 1
    down = next(line for line in text.splitlines() if line.startswith("| ") and "writable False" in line)
    cells = [cell.strip() for cell in down.strip("|").split("|")]
    assert int(cells[0]) > 0 and cells[1] == "0"  # served from the cached view, none failed
    assert cells[3].startswith("503")  # a write says the store is unavailable


@pytest.mark.slow  # netcal's torch loop alone takes 10 to 20 s on one real set
def test_methods_bench_times_the_new_methods_next_to_their_peers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    run_bench(
        "bench_methods.py",
        *("--repeats", "1", "--sets", "kumar_vgg16_c10.npz", "--peers"),
        *("--synthetic-rows", "3000", "--peer-rows", "1000", "--write", "--readme", str(readme)),
    )
    text = readme.read_text()
    assert "<!-- bench_method_peers:start -->\n## New methods next to their peer packages" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| synthetic 3,000 x 10")]
    methods = {row[1] for row in rows}
    assert methods >= {
        "beta, top-label problem",
        "venn_abers, one-vs-rest",
        "dirichlet",
        "ensemble_temperature",
    }
    # the slow peers ran on the first 1,000 rows, ours on all 3,000 and again on those 1,000
    assert any(row[2] == "1,000" and row[5] == "venn-abers" for row in rows)
    assert "| venn abers |" in text  # the method table has the Venn-Abers row
