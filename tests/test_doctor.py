"""`suwen doctor`: every check with its fix, exit 1 exactly when something `ask` needs is
missing, indexes checked against the encoder their queries would use."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from suwen.cli import app
from suwen.config import Settings
from suwen.indexes import store


def doctor(home: Path, *args: str) -> tuple[int, dict[str, dict[str, object]]]:
    done = CliRunner().invoke(app, ["--home", str(home), *args, "doctor", "--json"])
    rows = json.loads(done.stdout)
    return done.exit_code, {row["name"]: row for row in rows}


def fake_index(home: Path, name: str, kind: str, encoder: str, dim: int) -> None:
    version = home / "indexes" / name / "v000001"
    version.mkdir(parents=True)
    manifest = store.IndexManifest(name=name, kind=kind, encoder=encoder, dim=dim, count=3)
    store.write_manifest(version, manifest)
    (home / "indexes" / name / store.CURRENT).write_text("v000001")


@pytest.fixture()
def local_models(tiny_model_dir: Path, tiny_clip_dir: Path, minilm_path: Path) -> list[str]:
    return [
        "--set", f"vlm={tiny_model_dir}",
        "--set", f"image_encoder={tiny_clip_dir}",
        "--set", f"text_encoder={minilm_path}",
    ]  # fmt: skip


@pytest.fixture()
def vllm_stand_in() -> Iterator[str]:
    class Models(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"data": [{"id": "tiny"}]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_fresh_home_fails_on_the_missing_model_with_its_fix(tmp_path: Path):
    code, checks = doctor(tmp_path / "home")
    assert code == 1
    vlm = checks["model vlm"]
    assert (vlm["status"], vlm["needed"]) == ("fail", True)
    assert vlm["fix"] == "suwen models fetch lingshu-7b"
    assert checks["indexes"]["status"] == "warn"
    for name in ("Python", "torch", "vLLM", "FAISS", "free disk", "vLLM build"):
        assert checks[name]["status"] in ("ok", "warn"), name


def test_local_models_and_a_matching_index_pass(
    image_settings: Settings, image_index: str, local_models: list[str], tiny_clip_dir: Path
):
    code, checks = doctor(image_settings.home, *local_models)
    assert code == 0, checks
    row = checks[f"index {image_index}"]
    assert row["status"] == "ok"
    assert "image, 32 vectors of 32-d" in str(row["detail"])
    assert f"queries: {tiny_clip_dir}" in str(row["detail"])
    assert checks["model vlm"]["status"] == "ok"


def test_index_problems_are_named_with_their_fix(
    tmp_path: Path, local_models: list[str], minilm_path: Path
):
    home = tmp_path / "home"
    fake_index(home, "wrong-dim", "text", str(minilm_path), 768)
    fake_index(home, "pubmed", "text", "someone/not-here", 384)
    code, checks = doctor(home, *local_models)
    assert code == 1  # the default text index cannot be searched
    wrong = checks["index wrong-dim"]
    assert wrong["status"] == "fail" and "384-d" in str(wrong["fix"])
    missing = checks["index pubmed"]
    assert missing["needed"] and "not on this machine" in str(missing["fix"])


def test_vllm_urls_are_tried(tmp_path: Path, local_models: list[str], vllm_stand_in: str):
    home = tmp_path / "home"
    code, checks = doctor(home, *local_models, "--set", f"vllm_url={vllm_stand_in}")
    assert code == 0 and checks[f"vLLM {vllm_stand_in}"]["status"] == "ok"
    dead = "http://127.0.0.1:9"
    code, checks = doctor(home, *local_models, "--set", f"vllm_url={dead}")
    assert code == 1 and checks[f"vLLM {dead}"]["status"] == "fail"


def test_the_table_names_each_fix(tmp_path: Path):
    done = CliRunner().invoke(app, ["--home", str(tmp_path / "home"), "doctor"])
    assert done.exit_code == 1
    assert "lingshu-7b" in done.stdout and "fetch" in done.stdout
    assert "needed by `suwen ask`" in done.stdout


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        ("fpu sse2 avx2 fma avx512f avx512_vnni avx512_bf16", "int8 dot products (avx2, fma,"),
        ("fpu sse2 avx2 fma avx_vnni", "int8 dot products (avx2, fma, avx_vnni)"),
        ("fpu sse2 avx2 fma vaes", "AVX2 without int8 dot products (VNNI)"),
    ],
)
def test_the_cpu_check_says_whether_int8_query_encoding_is_fast_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str, said: str
) -> None:
    """The processor bounds search latency (README: 'The processor decides much of it'), so a
    user comparing with the README's figures sees which kind of processor this is."""
    from suwen import doctor as checks

    cpuinfo = tmp_path / "cpuinfo"
    core = f"processor\t: {{n}}\nmodel name\t: Test CPU [bold]9000[/bold]\nflags\t\t: {flags}\n"
    cpuinfo.write_text("\n".join(core.format(n=n) for n in range(2)), encoding="utf-8")
    monkeypatch.setattr(checks, "CPUINFO", cpuinfo)
    _, rows = doctor(tmp_path / "home")
    detail = str(rows["CPU"]["detail"])
    assert rows["CPU"]["status"] == "ok" and said in detail
    assert detail.startswith("Test CPU [bold]9000[/bold], ")


def test_the_cpu_check_without_cpuinfo_names_the_architecture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from suwen import doctor as checks

    monkeypatch.setattr(checks, "CPUINFO", tmp_path / "absent")
    _, rows = doctor(tmp_path / "home")
    assert rows["CPU"]["status"] == "ok" and "cores" in str(rows["CPU"]["detail"])
