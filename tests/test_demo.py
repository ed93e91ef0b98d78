"""`suwen demo` on the sample data that ships in the package: the data is there, licence-clean and
split correctly, the demo builds its indexes from it, and the whole command answers through real
vLLM with nothing but the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from suwen import demo
from suwen.errors import InputError
from suwen.indexes import store
from suwen.llm.server import ManagedServer

SAMPLE = demo.bundled_sample_data()
MAX_BYTES = 10 * 1024 * 1024


def sample_files() -> list[Path]:
    return [path for path in SAMPLE.rglob("*") if path.is_file()]


def test_sample_data_fits_the_budget_and_every_file_is_documented():
    files = sample_files()
    assert sum(path.stat().st_size for path in files) <= MAX_BYTES
    readme = (SAMPLE / "README.md").read_text(encoding="utf-8")
    for folder in ("pubmedqa", "vqa_rad", "imaging"):
        for path in (SAMPLE / folder).glob("*.*"):
            assert f"`{folder}/{path.name}`" in readme, path
    for licence in ("PubMedQA-MIT.txt", "CC0-1.0.txt", "pydicom-MIT.txt", "Apache-2.0.txt"):
        assert (SAMPLE / "LICENSES" / licence).stat().st_size > 1000
        assert f"LICENSES/{licence}" in readme


def test_the_case_images_and_the_test_questions_are_disjoint():
    vqa_rad = SAMPLE / "vqa_rad"
    train = json.loads((vqa_rad / "trainset.json").read_text(encoding="utf-8"))
    test = json.loads((vqa_rad / "testset.json").read_text(encoding="utf-8"))
    case_images = {row["image_name"] for row in train}
    test_images = {row["image_name"] for row in test}
    assert len(case_images) == 40
    assert test and not case_images & test_images
    shipped = {path.name for path in (vqa_rad / "images").iterdir()}
    assert shipped == case_images | test_images


def test_the_abstracts_are_outside_pubmedqas_test_split(shared_data: Path):
    records = json.loads((SAMPLE / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    test_split = json.loads((shared_data / "pubmedqa" / "test_ground_truth.json").read_text())
    assert len(records) == 300
    assert not set(records) & set(test_split)


def test_the_dicom_and_nifti_samples_load():
    from suwen.medimage import load_image

    for name in ("CT_small.dcm", "anatomical.nii.gz"):
        image = load_image(SAMPLE / "imaging" / name)
        assert min(image.size) > 16


def test_a_folder_without_the_layout_is_refused_in_one_line(tmp_path: Path):
    with pytest.raises(InputError) as caught:
        demo.sample_paths(tmp_path)
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.slow
@pytest.mark.vllm
def test_suwen_demo_answers_end_to_end_from_the_packaged_sample(
    tmp_path: Path, vllm_server: ManagedServer
):
    """The README's first command after set-up, with no data folder beside the package. It
    uses the session's running tiny-model server instead of starting a second one, with that
    server's key, as a user of a running server passes it (VLLM_API_KEY)."""
    home = tmp_path / "home"
    done = run_demo(home, tmp_path, vllm_server)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Is there evidence of an aortic aneurysm?" in done.stdout
    assert "VQA-RAD's answer: yes" in done.stdout
    assert "demo-pubmed" in done.stderr  # the hint naming the indexes it left behind
    _, text = store.open_version(home / "indexes", demo.TEXT_INDEX)
    image_version, images = store.open_version(home / "indexes", demo.IMAGE_INDEX)
    assert (text.kind, images.kind) == ("text", "image")
    assert text.count >= 300  # chunks: at least one per abstract
    assert images.count == 40
    again = run_demo(home, tmp_path, vllm_server)
    assert again.returncode == 0, again.stderr[-2000:]
    # The second run reuses the indexes instead of rebuilding them.
    assert store.open_version(home / "indexes", demo.IMAGE_INDEX)[0] == image_version


def run_demo(home: Path, cwd: Path, server: ManagedServer) -> subprocess.CompletedProcess[str]:
    suwen = str(Path(sys.executable).with_name("suwen"))
    return subprocess.run(
        [suwen, "demo", "--offline", "--vllm-url", server.url],
        capture_output=True,
        text=True,
        env={**os.environ, "SUWEN_HOME": str(home), "VLLM_API_KEY": server.api_key or ""},
        cwd=cwd,
        timeout=900,
        check=False,
    )


def test_data_still_accepts_the_full_shared_layout(shared_data: Path, tmp_path: Path):
    pubmedqa, vqa_rad = demo.sample_paths(shared_data)
    assert pubmedqa.name == "ori_pqal.json"
    question = demo.demo_question(vqa_rad)
    assert question.text == demo.demo_question(SAMPLE / "vqa_rad").text
    cases = demo.write_case_folder(vqa_rad, tmp_path / "cases", limit=5)
    test_images = {row["image_name"] for row in json.loads((vqa_rad / "testset.json").read_text())}
    written = sorted(path.name for path in cases.glob("*.jpg"))
    assert len(written) == 5 and not set(written) & test_images
    assert all((cases / name).with_suffix(".txt").read_text() for name in written)


def test_a_demo_index_another_installation_built_is_rebuilt_not_refused(tmp_path: Path):
    """The demo ran once from another checkout whose environment (and its copy of MiniLM) is
    gone: its index names an encoder not on this machine. The demo rebuilds its own index
    rather than stopping with an error; an index it can search is kept as it is."""
    import shutil

    from suwen.config import Settings
    from suwen.devtools.tiny_clip import write_tiny_clip
    from suwen.models import bundled_minilm
    from suwen.retrieval.text import TextSearcher

    data = tmp_path / "data"
    (data / "pubmedqa").mkdir(parents=True)
    records = json.loads((SAMPLE / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    few = dict(list(records.items())[:5])
    (data / "pubmedqa" / "ori_pqal.json").write_text(json.dumps(few), encoding="utf-8")
    shutil.copytree(SAMPLE / "vqa_rad", data / "vqa_rad")
    clip = tmp_path / "clip"
    write_tiny_clip(clip)
    elsewhere = tmp_path / "old-checkout" / "minilm"
    shutil.copytree(bundled_minilm(), elsewhere)

    def settings(encoder: Path) -> Settings:
        base = Settings(home=tmp_path / "home", text_encoder=str(encoder), image_encoder=str(clip))  # type: ignore[arg-type]
        return demo.demo_settings(base, offline=False)

    demo.ensure_indexes(settings(elsewhere), data)
    indexes = tmp_path / "home" / "indexes"
    images_before = store.open_version(indexes, demo.IMAGE_INDEX)[0]
    shutil.rmtree(elsewhere.parent)  # that installation is gone
    steps: list[str] = []
    current = settings(bundled_minilm())
    demo.ensure_indexes(current, data, steps.append)
    assert any(demo.TEXT_INDEX in step and "cannot be searched here" in step for step in steps)
    assert store.open_version(indexes, demo.IMAGE_INDEX)[0] == images_before  # still usable
    with TextSearcher.open(current, demo.TEXT_INDEX) as searcher:
        assert searcher.search(next(iter(few.values()))["QUESTION"], 3)
    assert not list(indexes.glob(".*removed*"))


def test_an_index_removal_killed_before_its_files_are_gone_leaves_no_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A removal killed after the index is renamed away (here: deleting its files fails) leaves
    a folder that no listing shows and no search opens; its name is free again."""
    import shutil

    indexes = tmp_path / "indexes"
    version = indexes / "gone" / "v000001"
    version.mkdir(parents=True)
    (version / store.MANIFEST).write_text("{}", encoding="utf-8")
    (indexes / "gone" / store.CURRENT).write_text("v000001", encoding="ascii")
    assert store.current_version(indexes / "gone") == version

    def killed(path: Path, ignore_errors: bool = False) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        store.remove_index(indexes, "gone")
    monkeypatch.undo()
    assert not (indexes / "gone").exists()
    assert store.list_indexes(indexes) == []
    assert all(store.current_version(p) is None for p in indexes.iterdir())
