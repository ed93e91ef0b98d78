"""`suwen eval` end to end through a real vLLM server (the tiny random Lingshu-architecture
checkpoint on the CPU) with real MiniLM and tiny-BiomedCLIP indexes: VQA-RAD (20) and PubMedQA
(20) from ../shared/data in both modes, killed halfway through and resumed.

The model's words are random, so accuracy means nothing here; what must hold whatever it says:
every output file exists and parses, nothing finished is asked again after the kill, the report
has both modes, and every number in it equals the one recomputed from the sample files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from suwen.config import Settings
from suwen.evaluate.stats import compare
from suwen.llm.server import ManagedServer
from tests.fixtures_images import INDEX_NAME as IMAGE_INDEX
from tests.fixtures_text import TEXT_INDEX
from tests.test_eval_requests import lay_out_iu_xray

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BENCHMARKS = ("VQA-RAD", "PubMedQA")
MODES = ("plain", "agent")
LIMIT = 20
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def eval_env(
    tmp_path: Path,
    tiny_model_dir: Path,
    minilm_path: Path,
    tiny_clip_dir: Path,
    text_index_home: Path,
    image_settings: Settings,
    image_index: str,
    vllm_server: ManagedServer,
) -> dict[str, str]:
    """A data home holding copies of the session's text and image indexes, and the settings
    (as a user would set them in the environment) that make the agent cheap on the tiny model.
    The session's server was started from another data home, so its API key is passed the way
    a user passes a running server's key: VLLM_API_KEY."""
    home = tmp_path / "home"
    shutil.copytree(text_index_home / "indexes" / TEXT_INDEX, home / "indexes" / TEXT_INDEX)
    shutil.copytree(image_settings.home / "indexes" / image_index, home / "indexes" / IMAGE_INDEX)
    return os.environ | {
        "SUWEN_HOME": str(home),
        "SUWEN_VLM": str(tiny_model_dir),
        "SUWEN_TEXT_ENCODER": str(minilm_path),
        "SUWEN_IMAGE_ENCODER": str(tiny_clip_dir),
        "SUWEN_TEXT_INDEX": TEXT_INDEX,
        "SUWEN_IMAGE_INDEX": IMAGE_INDEX,
        "SUWEN_DEVICE": "cpu",
        "SUWEN_MAX_TOKENS": "16",
        "SUWEN_ROUNDS": "1",
        "SUWEN_MAX_QUERIES": "1",
        "SUWEN_TEXT_K": "3",
        "SUWEN_IMAGE_K": "2",
        "COLUMNS": "200",
        "VLLM_API_KEY": vllm_server.api_key or "",
    }


def _cli(*options: str) -> list[str]:
    """``suwen eval`` with ``options``, as a user runs it."""
    return [sys.executable, "-c", "from suwen.cli import main; main()", "eval", *options]


def _eval_args(shared_data: Path, out: Path, url: str) -> list[str]:
    return _cli(
        "--benchmark",
        ",".join(BENCHMARKS),
        "--data",
        str(shared_data),
        "--modes",
        ",".join(MODES),
        "--out",
        str(out),
        "--limit",
        str(LIMIT),
        "--concurrency",
        "4",
        "--vllm-url",
        url,
    )


def _lines(path: Path) -> list[str]:
    """The complete lines of a file (a kill may leave a torn last line without its newline)."""
    return path.read_text("utf-8").split("\n")[:-1] if path.exists() else []


def _samples_file(out: Path, benchmark: str, mode: str) -> Path:
    return out / benchmark / f"{mode}.jsonl"


def _kill_when_agent_mode_is_halfway(child: subprocess.Popen[str], watched: Path) -> None:
    """SIGKILL the run once a few VQA-RAD agent answers are on disk (plain mode is done)."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and child.poll() is None:
        if len(_lines(watched)) >= 3:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    child.wait(timeout=60)


def test_eval_both_modes_through_real_vllm_killed_and_resumed(
    eval_env: dict[str, str], vllm_url: str, shared_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    args = _eval_args(shared_data, out, vllm_url)
    watched = _samples_file(out, "VQA-RAD", "agent")
    child = subprocess.Popen(
        args, cwd=REPO, env=eval_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _kill_when_agent_mode_is_halfway(child, watched)
    first_output = child.stdout.read() if child.stdout else ""
    assert child.returncode == -signal.SIGKILL, first_output
    before = {str(path.relative_to(out)): _lines(path) for path in out.glob("*/*.jsonl")}
    assert len(before["VQA-RAD/plain.jsonl"]) == LIMIT
    agent_done = len(before["VQA-RAD/agent.jsonl"])
    assert 3 <= agent_done < LIMIT

    resumed = subprocess.run(args, cwd=REPO, env=eval_env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"VQA-RAD plain: {LIMIT}/{LIMIT} done (0 now)" in resumed.stdout
    assert f"VQA-RAD agent: {LIMIT}/{LIMIT} done ({LIMIT - agent_done} now)" in resumed.stdout

    records = _check_sample_files(out, before)
    _check_report(out, records)


def _check_sample_files(
    out: Path, before: dict[str, list[str]]
) -> dict[tuple[str, str], list[dict[str, object]]]:
    records: dict[tuple[str, str], list[dict[str, object]]] = {}
    selections = json.loads((out / "run.json").read_text("utf-8"))["selections"]
    for benchmark in BENCHMARKS:
        for mode in MODES:
            path = _samples_file(out, benchmark, mode)
            lines = _lines(path)
            rows = [json.loads(line) for line in lines]  # every line parses
            assert sorted(str(r["id"]) for r in rows) == sorted(selections[benchmark])
            # What finished before the kill is kept as it was and never asked again.
            kept = before.get(str(path.relative_to(out)), [])
            assert lines[: len(kept)] == kept
            for row in rows:
                assert row["response"] is not None and isinstance(row["correct"], bool)
                assert row["latency"] > 0 and row["tokens"]["prompt"] > 0  # type: ignore[index, operator]
                if mode == "agent":
                    assert row["leakage_guard"] is True and row["model_calls"] >= 3  # type: ignore[operator]
            records[(benchmark, mode)] = rows
    return records


def _check_report(out: Path, records: dict[tuple[str, str], list[dict[str, object]]]) -> None:
    for name in ("metrics.json", "report.md", "report.html", "chart.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text("utf-8"))
    report = (out / "report.md").read_text("utf-8")
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert "| plain | agent |" in table[0]
    for benchmark in BENCHMARKS:
        entry = metrics["benchmarks"][benchmark]
        accuracy = {}
        for mode in MODES:
            rows = records[(benchmark, mode)]
            right = sum(bool(r["correct"]) for r in rows)
            unparsed = sum(bool(r["unparsed"]) for r in rows)
            suwen = entry["modes"][mode]["suwen"]
            assert (suwen["correct"], suwen["total"], suwen["unparsed"]) == (right, LIMIT, unparsed)
            accuracy[mode] = right / LIMIT
            assert suwen["accuracy"] == pytest.approx(accuracy[mode])
        by_id = {m: {r["id"]: bool(r["correct"]) for r in records[(benchmark, m)]} for m in MODES}
        ids = sorted(by_id["plain"])
        paired = compare([by_id["plain"][i] for i in ids], [by_id["agent"][i] for i in ids], seed=0)
        assert entry["paired"]["fixed"] == paired.fixed
        assert entry["paired"]["broken"] == paired.broken
        assert entry["paired"]["delta"] == pytest.approx(paired.delta)
        row = next(line for line in table if line.startswith(f"| {benchmark} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == f"{LIMIT}/{LIMIT} of {LIMIT}"
        right = {mode: round(accuracy[mode] * LIMIT) for mode in MODES}
        assert cells[2:5] == [
            f"{100 * accuracy['plain']:.1f} ({right['plain']}/{LIMIT})",
            f"{100 * accuracy['agent']:.1f} ({right['agent']}/{LIMIT})",
            f"{100 * paired.delta:+.1f}",
        ]
        assert cells[7:9] == [str(paired.fixed), str(paired.broken)]


def test_iu_xray_reports_with_labelled_images_and_a_blank_baseline_through_real_vllm(
    eval_env: dict[str, str], vllm_url: str, shared_data: Path, tmp_path: Path
) -> None:
    """MedEvalKit's IU-Xray layout (the fixture: shared chest images, written reports), two
    and three images per study sent with '<image_i>: ' labels to the real server, plain and
    blank-image modes, and the report-generation table with every metric accounted for."""
    iu_xray = lay_out_iu_xray(shared_data, tmp_path / "IU_XRAY")
    out = tmp_path / "reports"
    args = _cli(
        "--benchmark",
        "IU-Xray",
        "--data",
        str(iu_xray),
        "--modes",
        "plain,blank",
        "--out",
        str(out),
        "--vllm-url",
        vllm_url,
    )
    done = subprocess.run(args, cwd=REPO, env=eval_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "IU-Xray plain: 3/3 done (3 now)" in done.stdout
    assert "IU-Xray plain-blank: 3/3 done (3 now)" in done.stdout
    for mode in ("plain", "plain-blank"):
        rows = [json.loads(line) for line in _lines(out / "IU-Xray" / f"{mode}.jsonl")]
        assert all(row["asked"] and row["tokens"]["prompt"] > 0 for row in rows)
        assert sorted(len(row["images_shown"]) for row in rows) == [2, 2, 3]
    metrics = json.loads((out / "metrics.json").read_text("utf-8"))
    values = metrics["benchmarks"]["IU-Xray"]["modes"]["plain"]["report_metrics"]["values"]
    for key in ("bleu1", "bleu4", "rougeL", "rougeL_rouge_package", "cider"):
        assert isinstance(values[key], float), key
    assert isinstance(values["meteor"], float) or "not_computed" in values["meteor"]
    assert all("not_computed" in values[name] for name in ("RaTE", "GREEN"))
    run = json.loads((out / "run.json").read_text("utf-8"))
    assert run["provenance"]["vllm_version"][vllm_url]  # the server said its version
    assert "## Report generation" in (out / "report.md").read_text("utf-8")


def test_case_example_counts_compared_through_the_real_cli(
    eval_env: dict[str, str], vllm_url: str, shared_data: Path, tmp_path: Path
) -> None:
    """`--case-examples 0,2` through the real CLI and server: the agent runs once per count
    into its own samples file, the report compares them, and a second run resumes both."""
    out = tmp_path / "examples"
    args = _cli(
        "--benchmark",
        "VQA-RAD",
        "--data",
        str(shared_data),
        "--modes",
        "plain,agent",
        "--case-examples",
        "0,2",
        "--out",
        str(out),
        "--limit",
        "3",
        "--vllm-url",
        vllm_url,
    )
    done = subprocess.run(args, cwd=REPO, env=eval_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for count in (0, 2):
        assert f"VQA-RAD agent ({count} case examples): 3/3 done (3 now)" in done.stdout
        rows = [
            json.loads(line) for line in _lines(out / "VQA-RAD" / f"agent@examples{count}.jsonl")
        ]
        assert len(rows) == 3 and {row["case_examples"] for row in rows} == {count}
    metrics = json.loads((out / "metrics.json").read_text("utf-8"))
    entry = metrics["benchmarks"]["VQA-RAD"]
    assert set(entry["modes"]) == {"plain", "agent@examples0", "agent@examples2"}
    scored = {
        key: {
            r["id"]
            for r in map(json.loads, _lines(out / "VQA-RAD" / f"{key}.jsonl"))
            if r["correct"] is not None
        }
        for key in ("agent@examples0", "agent@examples2")
    }
    paired = scored["agent@examples0"] & scored["agent@examples2"]
    # A question whose prompt the tiny server refuses (too long with two example images) is
    # recorded as not asked, not scored: the comparison covers the questions both counts scored.
    if paired:
        assert entry["case_examples"]["agent"]["0->2"]["n"] == len(paired)
        assert "## Similar cases as worked examples" in (out / "report.md").read_text("utf-8")
    again = subprocess.run(args, cwd=REPO, env=eval_env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "VQA-RAD agent (2 case examples): 3/3 done (0 now)" in again.stdout


def test_report_benchmark_in_agent_mode_drafts_through_the_real_server(
    eval_env: dict[str, str], vllm_url: str, shared_data: Path, tmp_path: Path
) -> None:
    """Agent mode on a report benchmark takes `suwen report`'s path to the real server (look,
    plan, retrieve, reread, report): every study asked with its images, the draft kept as the
    full answer, and report metrics computed for the agent as for plain mode."""
    iu_xray = lay_out_iu_xray(shared_data, tmp_path / "IU_XRAY")
    out = tmp_path / "agent-reports"
    args = _cli(
        "--benchmark", "IU-Xray", "--data", str(iu_xray), "--modes", "agent", "--out", str(out),
        "--vllm-url", vllm_url,
    )  # fmt: skip
    done = subprocess.run(args, cwd=REPO, env=eval_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "IU-Xray agent: 3/3 done (3 now)" in done.stdout
    rows = [json.loads(line) for line in _lines(out / "IU-Xray" / "agent.jsonl")]
    assert all(row["asked"] and row["model_calls"] >= 2 for row in rows)
    assert all(row["tokens"]["prompt"] > 0 and row["full_answer"] for row in rows)
    metrics = json.loads((out / "metrics.json").read_text("utf-8"))
    report = metrics["benchmarks"]["IU-Xray"]["modes"]["agent"]["report_metrics"]
    assert report["n"] == 3 and isinstance(report["values"]["bleu1"], float)
