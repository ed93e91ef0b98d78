"""What `suwen eval` sends and records: MedEvalKit's sampling on every request, images at
MedEvalKit's pixel budget with its '<image_i>: ' labels, questions that cannot be asked counted
(not dropped), run.json's provenance, the image baselines, and IU-Xray's report metrics on a
small fixture in MedEvalKit's layout. The model is a scripted vLLM behind the real client."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from suwen.config import Settings
from suwen.errors import InputError
from suwen.evaluate.benchmarks import Sample, load_benchmark
from suwen.evaluate.report import REPORT_HEADERS, write_report
from suwen.evaluate.runner import (
    MEDEVALKIT_SAMPLING,
    EvalConfig,
    ImagePolicy,
    parse_modes,
    read_records,
    run_evaluation,
    samples_path,
    shuffled_donors,
)
from suwen.evaluate.session import eval_settings
from suwen.types import AgentResult, Question, TokenUsage
from tests.test_llm_client import FakeVLLM, completion

FIXTURE = Path(__file__).parent / "data" / "iu_xray_fixture.json"


def _config(out: Path, benchmarks: list[str], **kw: Any) -> EvalConfig:
    return EvalConfig(benchmarks=benchmarks, out=out, model="fake-vlm", max_tokens=32, **kw)


def _client(tmp_path: Path, vllm: FakeVLLM, config: EvalConfig) -> Any:
    settings = Settings(home=tmp_path / "home", vlm="fake-vlm", max_retries=0)
    return vllm.client(eval_settings(settings, config))


def _content(body: dict[str, Any]) -> list[dict[str, Any]]:
    content = body["messages"][-1]["content"]
    assert isinstance(content, list)
    return list(content)


def _image_size(part: dict[str, Any]) -> tuple[int, int]:
    data = part["image_url"]["url"].split("base64,", 1)[1]
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return image.size


def lay_out_iu_xray(shared_data: Path, folder: Path) -> Path:
    """The fixture's studies in MedEvalKit's IU_XRAY layout (test.json + images/)."""
    (folder / "images").mkdir(parents=True)
    studies = json.loads(FIXTURE.read_text())["studies"]
    for study in studies:
        for name, source in zip(study["image"], study["sources"], strict=True):
            with Image.open(shared_data / "vqa_rad" / "images" / source) as image:
                image.convert("RGB").save(folder / "images" / name)
    rows = [{k: v for k, v in s.items() if k != "sources"} for s in studies]
    (folder / "test.json").write_text(json.dumps(rows))
    return folder


@pytest.fixture()
def iu_xray(shared_data: Path, tmp_path: Path) -> Path:
    return lay_out_iu_xray(shared_data, tmp_path / "IU_XRAY")


# -- sampling, image budget and labels ---------------------------------------------------------


def test_every_request_carries_medevalkits_sampling_and_images(
    shared_data: Path, iu_xray: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    vqa = load_benchmark("VQA-RAD", shared_data, cache, limit=3, seed=0)
    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 1600), (90, 90, 90)).save(big)
    vqa[0] = vqa[0].model_copy(update={"images": [str(big)]})
    reports = load_benchmark("IU-Xray", iu_xray, cache)
    out = tmp_path / "out"
    config = _config(out, ["VQA-RAD", "IU-Xray"], modes=["plain"], judge=True)
    vllm = FakeVLLM(completion("<judge>0</judge>"))
    asyncio.run(
        run_evaluation(
            config,
            {"VQA-RAD": vqa, "IU-Xray": reports},
            model=_client(tmp_path, vllm, config),
            answerer=None,
        )
    )
    bodies = [body for _, body in vllm.requests]
    assert len(bodies) >= 3 + 3  # every question, plus the judge's calls
    for body in bodies:
        assert body["temperature"] == 0.0 and body["top_p"] == 0.0001
        assert body["top_k"] == -1 and body["repetition_penalty"] == 1.0
    asked = [b for b in bodies if isinstance(b["messages"][-1]["content"], list)]
    single = next(b for b in asked if any(p.get("text") == vqa[0].prompt for p in _content(b)))
    parts = _content(single)
    # One image: no label, the image first (MedEvalKit's 'image' layout).
    assert [p["type"] for p in parts] == ["image_url", "text"]
    # qwen_vl_utils' budget keeps a 3.2 Mpx image whole (to multiples of 28), where the
    # product's 1 Mpx budget would shrink it.
    assert _image_size(parts[0]) == (1988, 1596)
    study = next(b for b in asked if len([p for p in _content(b) if p["type"] == "image_url"]) == 3)
    kinds = [(p["type"], p.get("text")) for p in _content(study)]
    assert kinds[:6] == [
        ("text", "<image_1>: "),
        ("image_url", None),
        ("text", "<image_2>: "),
        ("image_url", None),
        ("text", "<image_3>: "),
        ("image_url", None),
    ]
    assert kinds[6][1] == reports[0].prompt


def test_eval_settings_raise_the_servers_image_limit_for_its_run(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, vllm_max_images=4)
    config = _config(tmp_path, ["VQA-RAD"], images=ImagePolicy(max_images=6))
    adjusted = eval_settings(settings, config)
    assert adjusted.vllm_max_images == 6 and adjusted.vllm_image_max_pixels == 12_845_056
    assert (adjusted.top_p, adjusted.top_k, adjusted.repetition_penalty) == (0.0001, -1, 1.0)
    assert settings.top_p is None  # the product's own settings are untouched


# -- questions that cannot be asked ------------------------------------------------------------


def test_questions_that_cannot_be_asked_are_counted_next_to_the_accuracy(
    shared_data: Path, tmp_path: Path
) -> None:
    vqa = load_benchmark("VQA-RAD", shared_data, tmp_path / "cache", limit=6, seed=2)
    crowded = vqa[1].model_copy(update={"images": vqa[1].images * 7})
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    unreadable = vqa[2].model_copy(update={"images": [str(broken)]})
    too_long = vqa[3]
    samples = [vqa[0], crowded, unreadable, too_long, vqa[4], vqa[5]]

    def reply(body: dict[str, Any]) -> httpx.Response:
        text = _content(body)[-1]["text"]
        if text == too_long.prompt:
            message = "This model's maximum context length is 8192 tokens."
            return httpx.Response(400, json={"error": {"message": message}})
        if text == vqa[4].prompt:
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        return completion("yes")

    out = tmp_path / "out"
    config = _config(out, ["VQA-RAD"], modes=["plain"])
    vllm = FakeVLLM(reply)
    summaries = asyncio.run(
        run_evaluation(
            config,
            {"VQA-RAD": samples},
            model=_client(tmp_path, vllm, config),
            answerer=None,
        )
    )
    summary = summaries[0]
    # The 503 is worth retrying: failed now, asked again next run; the rest is recorded.
    assert [i for i, _ in summary.failed] == [vqa[4].id] and summary.not_asked == 3
    records = {r.id: r for r in read_records(samples_path(out, "VQA-RAD", "plain"))}
    assert "7 images; the run allows 6" in (records[crowded.id].not_asked_reason or "")
    assert str(broken) in (records[unreadable.id].not_asked_reason or "")
    assert "maximum context length" in (records[too_long.id].not_asked_reason or "")
    assert all(records[i].correct is None for i in (crowded.id, unreadable.id, too_long.id))
    metrics = write_report(out)
    plain = metrics["benchmarks"]["VQA-RAD"]["modes"]["plain"]
    assert plain["suwen"]["not_asked"] == 3 and plain["suwen"]["total"] == 2
    assert plain["medevalkit"]["total"] == 2
    report = (out / "report.md").read_text()
    accuracy = plain["suwen"]["accuracy"]
    assert f"{100 * accuracy:.1f} ({plain['suwen']['correct']}/2; 3 not asked)" in report
    assert "1 not asked: <id>: 7 images; the run allows 6" in report


# -- run.json ----------------------------------------------------------------------------------


def test_run_json_records_sampling_images_language_and_provenance(
    shared_data: Path, tmp_path: Path
) -> None:
    from suwen.evaluate.provenance import model_revision, provenance

    model_dir = tmp_path / "hub" / "snapshots" / "0123abcd"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text('{"transformers_version": "4.52.4"}')
    (model_dir / "generation_config.json").write_text('{"repetition_penalty": 1.05}')
    revision = model_revision(str(model_dir))
    assert revision["revision"] == "0123abcd" and revision["local"] is True
    assert revision["generation_config_sha256"] and revision["transformers_version"] == "4.52.4"
    assert model_revision("lingshu-medical-mllm/Lingshu-7B")["revision"] is None

    def version_server(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/version"
        return httpx.Response(200, json={"version": "0.32.0"})

    transport = httpx.MockTransport(version_server)
    original = httpx.AsyncClient.__init__

    def with_transport(self: httpx.AsyncClient, *args: Any, **kw: Any) -> None:
        original(self, *args, **{**kw, "transport": transport})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(httpx.AsyncClient, "__init__", with_transport)
        found = asyncio.run(provenance(str(model_dir), ["http://vllm:8000"]))
    assert found["vllm_version"] == {"http://vllm:8000": "0.32.0"}

    vqa = load_benchmark("VQA-RAD", shared_data, tmp_path / "cache", limit=2, seed=0)
    out = tmp_path / "out"
    config = _config(out, ["VQA-RAD"], modes=["plain"], lang="en")
    vllm = FakeVLLM(completion("no"))
    asyncio.run(
        run_evaluation(
            config,
            {"VQA-RAD": vqa},
            model=_client(tmp_path, vllm, config),
            answerer=None,
            provenance=found,
        )
    )
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["sampling"] == MEDEVALKIT_SAMPLING.model_dump()
    assert run["config"]["images"]["max_images"] == 6 and run["config"]["lang"] == "en"
    assert run["provenance"]["model"]["revision"] == "0123abcd"
    report = write_report(out)
    assert report["run"]["lang"] == "en"
    text = (out / "report.md").read_text()
    assert "languages: en" in text and "top_p=0.0001" in text and "vLLM 0.32.0" in text
    assert "model revision: 0123abcd" in text
    with pytest.raises(InputError, match="lang"):
        asyncio.run(
            run_evaluation(
                _config(out, ["VQA-RAD"], modes=["plain"]),
                {"VQA-RAD": vqa},
                model=_client(tmp_path, vllm, config),
                answerer=None,
            )
        )


# -- image baselines ---------------------------------------------------------------------------


def test_modes_accept_the_image_baselines() -> None:
    assert parse_modes("plain,agent") == ["plain", "agent"]
    assert parse_modes("plain,blank") == ["plain", "plain-blank"]
    assert parse_modes("plain,agent,blank,shuffled") == [
        "plain",
        "agent",
        "plain-blank",
        "agent-blank",
        "plain-shuffled",
        "agent-shuffled",
    ]
    assert parse_modes("shuffled") == ["plain-shuffled", "agent-shuffled"]
    assert parse_modes("agent-blank") == ["agent-blank"]
    with pytest.raises(InputError, match="--modes"):
        parse_modes("plain,noise")


def test_shuffled_images_are_another_questions_and_stay_the_same(
    shared_data: Path, tmp_path: Path
) -> None:
    vqa = load_benchmark("VQA-RAD", shared_data, tmp_path / "cache", limit=30, seed=4)
    donors = shuffled_donors(vqa, seed=0)
    assert donors == shuffled_donors(vqa, seed=0)
    for sample in vqa:
        donor = donors[sample.id]
        assert donor is not None and donor.id != sample.id
        assert not set(donor.exclude_image_sha256) & set(sample.exclude_image_sha256)
    assert len({donors[s.id].id for s in vqa if donors[s.id]}) > len(vqa) // 3  # type: ignore[union-attr]


class ImageAwareAgent:
    """An agent that answers right only when it is shown the question's own image."""

    def __init__(self, truth: dict[str, Sample]) -> None:
        self.truth = truth
        self.seen: list[Question] = []

    async def __call__(self, question: Question) -> AgentResult:
        self.seen.append(question)
        sample = self.truth[question.text]
        right = question.images == sample.images
        short = sample.gold if right else "something else"
        return AgentResult(
            question=question.text,
            answer=short,
            short_answer=short,
            tokens=TokenUsage(prompt=1, completion=1),
        )


def test_blank_and_shuffled_baselines_for_plain_and_agent(
    shared_data: Path, tmp_path: Path
) -> None:
    vqa = load_benchmark("VQA-RAD", shared_data, tmp_path / "cache", limit=8, seed=3)
    pubmed = load_benchmark("PubMedQA", shared_data, tmp_path / "cache", limit=2, seed=3)
    own = {s.prompt: s for s in vqa}
    sizes: dict[str, tuple[int, int]] = {}
    for sample in vqa:
        with Image.open(sample.images[0]) as image:
            sizes[sample.id] = image.size

    def reply(body: dict[str, Any]) -> httpx.Response:
        parts = _content(body) if isinstance(body["messages"][-1]["content"], list) else []
        sample = own.get(parts[-1]["text"]) if parts else None
        if sample is None:
            return completion("A")
        with Image.open(
            io.BytesIO(base64.b64decode(parts[0]["image_url"]["url"].split("base64,", 1)[1]))
        ) as image:
            extrema = image.convert("L").getextrema()
        # Right with a real image, "blind" guesses with a black one.
        return completion(sample.gold if extrema != (0, 0) else "unsure")

    out = tmp_path / "out"
    config = _config(out, ["VQA-RAD", "PubMedQA"], modes=parse_modes("plain,agent,blank,shuffled"))
    agent = ImageAwareAgent({s.to_question().text: s for s in vqa + pubmed})
    summaries = asyncio.run(
        run_evaluation(
            config,
            {"VQA-RAD": vqa, "PubMedQA": pubmed},
            model=_client(tmp_path, FakeVLLM(reply), config),
            answerer=agent,
        )
    )
    skipped = {(s.benchmark, s.mode) for s in summaries if s.skipped}
    assert skipped == {
        ("PubMedQA", mode)
        for mode in ("plain-blank", "agent-blank", "plain-shuffled", "agent-shuffled")
    }
    blank = read_records(samples_path(out, "VQA-RAD", "plain-blank"))
    for record in blank:
        (shown,) = record.images_shown
        with Image.open(shown) as image:
            assert image.size == sizes[record.id] and image.getextrema() == ((0, 0),) * 3
    shuffled = read_records(samples_path(out, "VQA-RAD", "agent-shuffled"))
    donors = shuffled_donors(vqa, seed=0)
    for record in shuffled:
        assert record.images_shown == donors[record.id].images  # type: ignore[union-attr]
        assert record.correct is False
    metrics = write_report(out)
    baselines = metrics["benchmarks"]["VQA-RAD"]["image_baselines"]
    assert baselines["plain"]["blank"]["real_accuracy"] == pytest.approx(1.0)
    assert baselines["plain"]["blank"]["baseline_accuracy"] == 0.0
    assert baselines["agent"]["shuffled"]["image_adds"] == pytest.approx(1.0)
    assert baselines["agent"]["blank"]["n"] == 8
    report = (out / "report.md").read_text()
    assert "## How much comes from the image" in report
    assert "| VQA-RAD | agent | 8/8 | 100.0 | 0.0 | +100.0 [" in report


# -- IU-Xray report generation -----------------------------------------------------------------


@pytest.mark.slow  # METEOR 1.5 loads its paraphrase table in a JVM (~10 s)
def test_iu_xray_reports_the_standard_metrics_in_medevalkits_layout(
    iu_xray: Path, tmp_path: Path
) -> None:
    reports = load_benchmark("IU-Xray", iu_xray, tmp_path / "cache")
    # MedEvalKit skips a study with neither findings nor impression; keeps the fields as stored.
    assert [s.id for s in reports] == ["open_i_fx1", "open_i_fx2", "open_i_fx3"]
    assert reports[2].gold.startswith("Findings:  Impression: Right lower lobe opacity")
    assert all(s.image_labels and s.kind == "report" for s in reports)
    by_prompt_count = {len(s.images): s for s in reports}

    def reply(body: dict[str, Any]) -> httpx.Response:
        images = [p for p in _content(body) if p["type"] == "image_url"]
        study = by_prompt_count.get(len(images), reports[0])
        return completion(study.gold if study.id == "open_i_fx1" else "Findings: Normal.")

    out = tmp_path / "out"
    config = _config(out, ["IU-Xray"], modes=["plain"])
    by_prompt_count = {3: reports[2], 2: reports[0]}
    asyncio.run(
        run_evaluation(
            config,
            {"IU-Xray": reports},
            model=_client(tmp_path, FakeVLLM(reply), config),
            answerer=None,
        )
    )
    metrics = write_report(out)
    values = metrics["benchmarks"]["IU-Xray"]["modes"]["plain"]["report_metrics"]["values"]
    records = read_records(samples_path(out, "IU-Xray", "plain"))
    from suwen.evaluate import text_metrics

    expected_bleu1 = sum(text_metrics.bleu(r.response, r.gold, 1) for r in records) / len(records)
    assert values["bleu1"] == pytest.approx(expected_bleu1)
    assert 0 < values["bleu4"] < values["bleu1"] < 1
    assert 0 < values["rougeL"] < 1 and 0 < values["rougeL_rouge_package"] < 1
    assert isinstance(values["cider"], float)
    assert (
        values["meteor"]
        == pytest.approx(
            text_metrics.meteor([r.response for r in records], [r.gold for r in records])
        )
        or "not_computed" in values["meteor"]
    )
    for name in ("RaTE", "GREEN"):
        assert "not installed" in values[name]["not_computed"]
    report = (out / "report.md").read_text()
    assert "## Report generation" in report and "| IU-Xray | plain | 3 |" in report
    assert "RaTE not computed: needs RaTEScore" in report
    # Lingshu-7B's published IU-Xray row stands under the metrics it shares with this run.
    published = next(line for line in report.splitlines() if "Lingshu-7B (published)*" in line)
    cells = [cell.strip() for cell in published.strip("|").split("|")]
    columns = dict(zip(REPORT_HEADERS, cells, strict=True))
    assert columns["Benchmark"] == "IU-Xray" and columns["BLEU-1"] == "–"
    assert columns["ROUGE-L (MedEvalKit's `rouge`)"] == "41.2" and columns["CIDEr"] == "180.7"
    assert columns["RaTE"] == "57.6" and columns["ROUGE-L"] == "–"
    assert "also gives SembScore 48.4, RadCliQ^-1 108.1" in report


def test_iu_xray_fixture_layout_matches_medevalkits_file(iu_xray: Path) -> None:
    rows = json.loads((iu_xray / "test.json").read_text())
    assert set(rows[0]) == {"id", "image", "findings", "impression"}
    assert all((iu_xray / "images" / name).is_file() for row in rows for name in row["image"])
    shutil.rmtree(iu_xray / "images")
    with pytest.raises(InputError):
        load_benchmark("IU-Xray", iu_xray / "missing", iu_xray / "cache")
