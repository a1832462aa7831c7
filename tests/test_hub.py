"""A refiner you can share: its model card, loading by Hub repo id from the local Hub cache (offline), the rule
that tells a repo id from a directory, and ``python -m noiserefine.hub push`` against a local stand-in Hub API."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import REFINER_PROMPTS as PROMPTS, randomise_lora, refiner_inputs, tiny_digits_backend
from noiserefine import hub, hub_refs
from noiserefine.config import load_config, refiner_run_config
from noiserefine.refiner import Refiner, load_refiner, save_refiner

BASE_MODEL = "stabilityai/stable-diffusion-2-1-base"
REPO_ID = "someone/tiny-refiner"
FILES = ["README.md", "config.yaml", "refiner.safetensors", "sampler.json"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A refiner with random LoRA weights exported from a run folder that holds an evaluation log (read-only:
    a test that changes it works on a copy)."""
    run_dir = tmp_path_factory.mktemp("exported") / "run"
    run_dir.mkdir()
    (run_dir / "eval_log.csv").write_text("step,row,accuracy,fid\n100,guided teacher,0.9,40.0\n100,unguided,0.5,"
                                          "90.0\n100,refined,0.8,50.0\n200,guided teacher,0.9,40.0\n200,unguided,"
                                          "0.5,90.0\n200,refined,0.85,45.5\n")
    cfg = load_config(overrides=["refiner.lora_rank=4", "refiner.lora_alpha=4.0", f"model.path={BASE_MODEL}",
                                 f"train.output_dir={run_dir}"])
    refiner = Refiner(tiny_digits_backend(), cfg.refiner)
    randomise_lora(refiner)
    noise, _ = refiner_inputs(refiner.backend)
    return {"dir": save_refiner(refiner, run_dir / "refiner", cfg), "expected": refiner.refine(noise, PROMPTS),
            "noise": noise}


def test_model_card_metadata_parses_and_names_the_base_model(exported):
    from huggingface_hub import ModelCard, metadata_load

    path = exported["dir"] / "README.md"
    card = ModelCard.load(path)
    assert card.data.base_model == BASE_MODEL and card.data.library_name == "noiserefine"
    assert {"noiserefine", "lora", "digits"} <= set(card.data.tags) and card.data.pipeline_tag == "text-to-image"
    assert metadata_load(path)["base_model"] == BASE_MODEL
    text = card.text
    assert "DDIMScheduler" in text and "cfg, scale 3" in text and "10 steps" in text
    assert "at step 200" in text and "| refined | 0.85 | 45.5 |" in text and "0.8 | 50.0" not in text


@pytest.mark.parametrize("model_path", ["artifacts/digits-teacher", "/models/teacher"])
def test_model_card_of_a_local_model_has_no_base_model_and_says_no_evaluation(model_path, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts" / "digits-teacher").mkdir(parents=True)  # the local teacher the run trained against
    cfg = load_config(overrides=["refiner.lora_rank=4", "refiner.lora_alpha=4.0", f"train.output_dir={tmp_path}",
                                 f"model.path={model_path}"])
    directory = save_refiner(Refiner(tiny_digits_backend(), cfg.refiner), tmp_path / "refiner", cfg)
    card = ModelCard.load(directory / "README.md")
    assert card.data.base_model is None  # a local folder, not a Hub id
    assert f"model: `{model_path}`" in card.text and "No evaluation was recorded" in card.text


def hub_cache_with(refiner_dir: Path, cache: Path, repo_id: str, revision: str = "a" * 40) -> Path:
    """The refiner placed in a Hub cache as huggingface_hub lays it out: blobs, snapshots/<rev>, refs/main."""
    from huggingface_hub.file_download import repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = storage / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir()
    for path in refiner_dir.iterdir():
        blob = storage / "blobs" / f"blob-{path.name}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read from the environment once, at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_refiner_loads_by_repo_id_from_the_hub_cache_offline(exported, offline_cache, monkeypatch, tmp_path):
    from huggingface_hub import scan_cache_dir

    snapshot = hub_cache_with(exported["dir"], offline_cache, REPO_ID)
    assert [r.repo_id for r in scan_cache_dir(offline_cache).repos] == [REPO_ID]  # the Hub's own reader agrees
    monkeypatch.chdir(tmp_path)
    loaded = load_refiner(REPO_ID, tiny_digits_backend())
    assert torch.equal(loaded.refine(exported["noise"], PROMPTS), exported["expected"])
    # the sampling and evaluation commands' --refiner: the cached snapshot and its config
    directory, cfg = refiner_run_config(REPO_ID, [], [])
    assert directory == snapshot and cfg.refiner.lora_rank == 4


def test_integrity_checks_apply_to_a_refiner_from_the_hub_cache(exported, offline_cache):
    snapshot = hub_cache_with(exported["dir"], offline_cache, REPO_ID)
    config = load_config(overrides=["refiner.lora_rank=2", "refiner.lora_alpha=2.0"])
    blob = (snapshot / "config.yaml").resolve()
    blob.write_text(blob.read_text().replace("lora_rank: 4", "lora_rank: 2"))
    assert config.refiner.lora_rank == 2
    with pytest.raises(ValueError, match="wrong shapes"):
        load_refiner(REPO_ID, tiny_digits_backend())


def test_repo_id_not_in_the_cache_offline_says_it_is_not_cached(offline_cache):
    with pytest.raises(FileNotFoundError, match="not in the local Hub cache.*HF_HUB_OFFLINE=1"):
        load_refiner("someone/never-downloaded", tiny_digits_backend())


@pytest.mark.parametrize("reference, repo_id", [
    ("someone/refiner", "someone/refiner"), ("refiner-only-name", "refiner-only-name"),
    ("./someone/refiner", None), ("/abs/someone/refiner", None), ("runs/sd21/refiner", None), ("~/refiner", None),
    ("someone/refiner/", None), ("../refiner", None), ("some one/refiner", None), ("a--b/c", None),
    (Path("someone/refiner"), None)])
def test_repo_id_or_directory_rule(reference, repo_id):
    assert hub_refs.hub_repo_id(reference) == repo_id


def test_a_directory_given_as_a_path_never_asks_the_hub(exported, monkeypatch, tmp_path):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked for a local directory")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(exported["dir"].parent.parent)  # run/refiner exists here
    assert hub_refs.resolve_refiner("./run/refiner") == Path("./run/refiner")
    assert load_refiner("./run/refiner", tiny_digits_backend()) is not None
    # the same folder written as a repo id is ambiguous: refused, neither the folder nor the Hub is used
    with pytest.raises(ValueError, match=r"both a Hub repo id and a local path; write ./run/refiner"):
        hub_refs.resolve_refiner("run/refiner")


class FakeHub(BaseHTTPRequestHandler):
    """The Hub API calls of ``create_repo`` + ``upload_folder`` (small files: uploaded inline; the README's metadata
    sent to validate-yaml first)."""

    state: dict = {}

    def log_message(self, *args):
        pass

    def _reply(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.state.setdefault("requests", []).append((self.path, self.headers.get("Authorization")))
        endpoint = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/api/repos/create":
            request = json.loads(body)
            self.state["created"] = request
            return self._reply({"url": f"{endpoint}/{request.get('organization')}/{request['name']}"})
        if self.path == "/api/validate-yaml":
            self.state["validated"] = json.loads(body)
            return self._reply({"errors": [], "warnings": []})
        if self.path.startswith(f"/api/models/{REPO_ID}/preupload/"):
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if self.path.startswith(f"/api/models/{REPO_ID}/commit/"):
            lines = [json.loads(line) for line in body.decode().splitlines() if line]
            self.state["committed"] = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                                       for item in lines if item["key"] == "file"}
            self.state["header"] = next(item["value"] for item in lines if item["key"] == "header")
            return self._reply({"commitUrl": f"{endpoint}/{REPO_ID}/commit/{'b' * 40}", "commitOid": "b" * 40})
        return self._reply({"error": f"not faked: {self.path}"}, 404)


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import constants

    FakeHub.state = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")  # HF_ENDPOINT, read once
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    yield FakeHub.state
    server.shutdown()
    server.server_close()


def test_push_uploads_the_refiner_files_through_the_hub_api(exported, fake_hub, capsys, tmp_path):
    directory = Path(shutil.copytree(exported["dir"], tmp_path / "refiner"))
    (directory / "notes.txt").write_text("not part of the refiner")
    assert hub.main(["push", str(directory), REPO_ID, "--private"]) == 0
    assert fake_hub["created"]["name"] == "tiny-refiner" and fake_hub["created"]["organization"] == "someone"
    assert fake_hub["created"].get("private") is True or fake_hub["created"].get("visibility") == "private"
    assert sorted(fake_hub["committed"]) == FILES  # only the refiner's files
    for name, data in fake_hub["committed"].items():
        assert data == (directory / name).read_bytes(), name
    assert all(auth == "Bearer hf_test_token" for _, auth in fake_hub["requests"])
    assert fake_hub["validated"]["content"] == (directory / "README.md").read_text()
    card = fake_hub["committed"]["README.md"].decode()
    assert f"--refiner {REPO_ID}" in card and "OWNER/NAME" not in card and f"base_model: {BASE_MODEL}" in card
    assert "someone/tiny-refiner" in capsys.readouterr().out


def test_push_refuses_a_folder_that_is_not_an_exported_refiner(tmp_path, fake_hub):
    with pytest.raises(FileNotFoundError, match="not an exported refiner: no refiner.safetensors"):
        hub.main(["push", str(tmp_path), REPO_ID])
    assert "requests" not in fake_hub
