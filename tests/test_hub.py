"""Models outside the catalog, from a fake Hugging Face Hub on 127.0.0.1 (HF_ENDPOINT points at it).

The server answers in the Hub's layout, ``/{repo_id}/resolve/{revision}/config.json``, with the
Hub's headers (ETag, X-Repo-Commit) and error codes (X-Error-Code: RepoNotFound, GatedRepo, as
huggingface_hub/utils/_http.py hf_raise_for_status reads them). No test reaches the network.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.cli import EXIT_BAD_INPUT, EXIT_HUB
from app.cli import main as cli_main
from app.hub import HubConfigs, resolve_model_source
from app.main import create_app
from app.settings import Settings
from app.workload import Workload

# A small Llama (hidden 256, 2 layers): what the fake Hub serves for org/tiny-llama.
TINY_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 688,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
              "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
GOOD_TOKEN = "hf_test_token_that_opens_the_gate"
TIMEOUT_S = 2.0
REPO = "/{org}/{name}/resolve/main/config.json"


class FakeHub(BaseHTTPRequestHandler):
    """Each repo name is a behaviour; every request is recorded (path, headers)."""

    requests: list[tuple[str, dict[str, str]]] = []

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).requests.append((self.path, {name.lower(): value for name, value in self.headers.items()}))
        parts = self.path.split("/")
        if len(parts) != 6 or parts[3:] != ["resolve", "main", "config.json"]:
            self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
            return
        getattr(self, "repo_" + parts[2].replace("-", "_"), self.repo_missing)()

    def _json(self, config: Any, raw: bytes | None = None) -> None:
        body = raw if raw is not None else json.dumps(config).encode()
        self._send(200, body, {"Content-Type": "application/json", "ETag": '"abc123"', "X-Repo-Commit": COMMIT})

    def repo_tiny_llama(self) -> None:
        self._json(TINY_LLAMA)

    def repo_missing(self) -> None:
        self._send(404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"})

    def repo_gated(self) -> None:
        if self.headers.get("Authorization") == f"Bearer {GOOD_TOKEN}":
            self._json(TINY_LLAMA)
            return
        self._send(401, b'{"error":"Access to model org/gated is restricted."}',
                   {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model org/gated is restricted."})

    def repo_private(self) -> None:
        self._send(401, b"Unauthorized")

    def repo_slow(self) -> None:
        time.sleep(TIMEOUT_S * 3)
        self._json(TINY_LLAMA)

    def repo_trickle(self) -> None:
        body = json.dumps(TINY_LLAMA).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for byte in body:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.2)

    def repo_malformed(self) -> None:
        self._json(None, raw=b'{"model_type": "llama", "hidden_size": ')

    def repo_nan(self) -> None:
        self._json(None, raw=json.dumps(TINY_LLAMA).replace('"hidden_size": 256', '"hidden_size": NaN').encode())

    def repo_huge(self) -> None:
        self._json({**TINY_LLAMA, "padding": "x" * (2 << 20)})

    def repo_huge_unsized(self) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b'{"padding": "' + b"x" * (2 << 20) + b'"}')

    def repo_remote_code(self) -> None:
        self._json({"model_type": "my_custom_lm", "auto_map": {"AutoModelForCausalLM": "modeling_custom.MyModel"}, "hidden_size": 64})

    def repo_deep_layers(self) -> None:
        self._json({**TINY_LLAMA, "num_hidden_layers": 10**9})

    def repo_renamed(self) -> None:
        self._send(307, b"", {"Location": REPO.format(org="org", name="tiny-llama")})

    def repo_broken(self) -> None:
        self._send(500, b"oops")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:  # a client that hung up on a slow answer
        pass


@pytest.fixture
def hub_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A fake Hub on a free loopback port; the Hub turned on (it is off for every other test)."""
    FakeHub.requests = []
    server = QuietServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    _point_at(monkeypatch, tmp_path, url)
    yield url
    server.shutdown()
    server.server_close()


def _point_at(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("VRAMPLAN_HUB_CACHE_DIR", str(tmp_path / "configs"))
    monkeypatch.setenv("VRAMPLAN_HUB_TIMEOUT_S", str(TIMEOUT_S))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # not a developer's login


@pytest.fixture
def down_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A loopback port with nothing listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    _point_at(monkeypatch, tmp_path, url)
    return url


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(hub_cache_dir=tmp_path / "configs", hub_timeout_s=TIMEOUT_S)


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings), raise_server_exceptions=False)


def _body(model_id: str) -> dict[str, Any]:
    return {"model": {"id": model_id}, "lora": {"r": 16}, "training": {"per_device_train_batch_size": 1, "max_seq_length": 512},
            "hardware": {"gpu": "T4"}}


def _issue(response: Any) -> dict[str, str]:
    return response.json()["detail"][0]


def test_a_model_outside_the_catalog_is_estimated_from_its_config_on_the_hub(hub_url, client, catalog, settings):
    response = client.post("/api/v1/estimate", json=_body("org/tiny-llama"))
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "org/tiny-llama"
    # the same answer as pasting the config: the id only names it
    pasted = client.post("/api/v1/estimate", json=_body("org/tiny-llama") | {"model": {"config": TINY_LLAMA}})
    assert {k: v for k, v in response.json().items() if k != "model"} == {k: v for k, v in pasted.json().items() if k != "model"}
    assert [path for path, _ in FakeHub.requests] == [REPO.format(org="org", name="tiny-llama")]  # config.json only


def test_a_fetched_config_is_cached_on_disk_and_not_fetched_again(hub_url, client, settings):
    for _ in range(3):
        assert client.post("/api/v1/estimate", json=_body("org/tiny-llama")).status_code == 200
    assert len(FakeHub.requests) == 1
    assert sorted(path.name for path in settings.hub_cache_dir.iterdir()) == ["org--tiny-llama.json"]
    envelope = json.loads((settings.hub_cache_dir / "org--tiny-llama.json").read_text())
    assert envelope["config"] == TINY_LLAMA and envelope["commit"] == COMMIT and envelope["id"] == "org/tiny-llama"


def test_offline_mode_answers_from_the_cache_only(hub_url, client, monkeypatch):
    assert client.post("/api/v1/estimate", json=_body("org/tiny-llama")).status_code == 200
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert client.post("/api/v1/estimate", json=_body("org/tiny-llama")).status_code == 200
    missing = client.post("/api/v1/estimate", json=_body("org/other-model"))
    assert missing.status_code == 404 and "offline" in _issue(missing)["reason"]
    assert len(FakeHub.requests) == 1


def test_a_model_the_hub_does_not_have_is_a_404(hub_url, client):
    response = client.post("/api/v1/estimate", json=_body("org/missing"))
    assert response.status_code == 404
    assert _issue(response)["field"] == "model.id"
    assert "no model 'org/missing' on the Hub" in _issue(response)["reason"]
    client.post("/api/v1/estimate", json=_body("org/missing"))
    assert len(FakeHub.requests) == 1  # remembered for a while: made-up ids do not flood the Hub


def test_a_gated_model_says_how_to_get_access_without_showing_the_token(hub_url, client, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    response = client.post("/api/v1/estimate", json=_body("org/gated"))
    assert response.status_code == 403
    assert "gated" in _issue(response)["reason"] and "HF_TOKEN" in _issue(response)["reason"]
    assert "authorization" not in FakeHub.requests[-1][1]
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_secret_value")
    response = client.post("/api/v1/estimate", json=_body("org/gated"))
    assert response.status_code == 403 and "has no access" in _issue(response)["reason"]
    assert "hf_wrong_secret_value" not in response.text and "hf_wrong_secret_value" not in caplog.text
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    assert client.post("/api/v1/estimate", json=_body("org/gated")).status_code == 200
    assert FakeHub.requests[-1][1]["authorization"] == f"Bearer {GOOD_TOKEN}"
    assert GOOD_TOKEN not in caplog.text


def test_a_plain_401_is_refused_with_a_message_about_hf_token(hub_url, client):
    response = client.post("/api/v1/estimate", json=_body("org/private"))
    assert response.status_code == 403 and "HF_TOKEN" in _issue(response)["reason"]


@pytest.mark.parametrize("name", ["slow", "trickle"])
def test_a_slow_hub_times_out_within_the_budget(hub_url, client, name):
    start = time.monotonic()
    response = client.post("/api/v1/estimate", json=_body(f"org/{name}"))
    elapsed = time.monotonic() - start
    assert response.status_code == 504
    assert "could not reach the Hub" in _issue(response)["reason"]
    assert elapsed < TIMEOUT_S + 0.5


@pytest.mark.parametrize(
    ("name", "status", "fragment"),
    [
        ("malformed", 502, "not valid JSON"),
        ("nan", 502, "NaN is not a JSON number"),
        ("huge", 502, "larger than 1,048,576 bytes"),
        ("huge-unsized", 502, "larger than 1,048,576 bytes"),
        ("broken", 502, "answered 500"),
        ("remote-code", 422, "never runs"),
        ("deep-layers", 422, "num_hidden_layers must be from 1 to 2,048"),
    ],
)
def test_an_unusable_answer_is_refused_with_a_reason(hub_url, client, settings, name, status, fragment):
    response = client.post("/api/v1/estimate", json=_body(f"org/{name}"))
    assert response.status_code == status, response.text
    assert fragment in _issue(response)["reason"] and _issue(response)["field"] == "model.id"
    assert client.get("/api/v1/healthz").status_code == 200


def test_an_unknown_architecture_names_the_known_ones(hub_url, client):
    reason = _issue(client.post("/api/v1/estimate", json=_body("org/remote-code")))["reason"]
    assert "'my_custom_lm'" in reason and "llama" in reason and "gpt2" in reason and "t5" in reason


def test_a_redirect_on_the_hub_is_followed(hub_url, client):
    assert client.post("/api/v1/estimate", json=_body("org/renamed")).status_code == 200


@pytest.mark.parametrize("model_id", ["../../etc/passwd", "org/../../etc/passwd", "/etc/passwd", "org/name/extra", "org--x/y",
                                      "org/.hidden", "org/name.git", "org/na me", "org/<script>", "ünïcode/model", "a" * 300])
def test_a_path_or_a_malformed_id_is_refused_before_any_request(hub_url, client, settings, model_id):
    response = client.post("/api/v1/estimate", json=_body(model_id))
    assert response.status_code == 422
    assert _issue(response)["field"] == "model.id"
    assert FakeHub.requests == []
    assert not settings.hub_cache_dir.exists()


def test_plan_and_export_take_a_hub_model_too(hub_url, client):
    plan = client.post("/api/v1/plan", json=_body("org/tiny-llama"))
    assert plan.status_code == 200 and plan.json()["plans"]
    script = client.post("/api/v1/export?file=train.py", json=_body("org/tiny-llama"))
    assert script.status_code == 200 and '"org/tiny-llama"' in script.text


def test_the_page_estimates_a_hub_model_and_keeps_its_id_in_links(hub_url, client):
    response = client.post("/", data={"model": "org/tiny-llama", "gpu": "T4", "method": "lora"})
    assert response.status_code == 200
    assert "org/tiny-llama" in response.text and "%22model_type%22" not in response.text  # links carry the id, not the config


def test_the_cli_estimates_a_hub_model(hub_url, capsys):
    assert cli_main(["estimate", "--model", "org/tiny-llama", "--gpu", "T4", "--method", "lora", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "org/tiny-llama"


@pytest.mark.parametrize(("model_id", "code", "fragment"), [
    ("org/missing", EXIT_BAD_INPUT, "no model 'org/missing' on the Hub"),
    ("org/gated", EXIT_HUB, "HF_TOKEN"),
    ("../../etc/passwd", EXIT_BAD_INPUT, "not a Hugging Face model id"),
])
def test_the_cli_says_what_the_hub_said_in_one_line(hub_url, capsys, model_id, code, fragment):
    assert cli_main(["check", "--model", model_id, "--gpu", "T4"]) == code
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err


def test_with_the_hub_down_the_api_says_so_at_once(down_url, client):
    start = time.monotonic()
    response = client.post("/api/v1/estimate", json=_body("org/tiny-llama"))
    assert response.status_code == 504
    assert "could not reach the Hub" in _issue(response)["reason"]
    assert time.monotonic() - start < 10


def test_with_the_hub_down_the_cli_says_so_within_ten_seconds(down_url):
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "app.cli", "check", "--model", "org/tiny-llama", "--gpu", "T4"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == EXIT_HUB
    assert "could not reach the Hub" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - start < 10


def test_a_hub_that_accepts_but_never_answers_does_not_hold_the_cli(monkeypatch, tmp_path):
    """A socket that listens but never answers: the CLI still exits within the budget (daemon fetch thread)."""
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(8)
        _point_at(monkeypatch, tmp_path, f"http://127.0.0.1:{sink.getsockname()[1]}")
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "app.cli", "check", "--model", "org/tiny-llama", "--gpu", "T4"],
                              capture_output=True, text=True, timeout=30)
        elapsed = time.monotonic() - start
    assert done.returncode == EXIT_HUB and "could not reach the Hub" in done.stderr
    assert elapsed < TIMEOUT_S + 5  # the interpreter's start-up included


def test_the_default_budget_is_at_most_ten_seconds():
    assert Settings.model_fields["hub_timeout_s"].default <= 10


def test_a_catalog_model_never_touches_the_hub(hub_url, catalog, settings):
    workload = Workload.model_validate(_body("meta-llama/Llama-2-7b-hf"))
    assert resolve_model_source(workload, catalog, HubConfigs(settings)) is workload
    assert FakeHub.requests == []


def test_a_slow_hub_look_up_does_not_hold_up_estimates_of_catalog_models(hub_url, settings):
    """The Hub is asked from the thread pool; catalog estimates are answered on the event loop meanwhile."""
    import asyncio

    import httpx

    async def both() -> tuple[float, bool, int]:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://vramplan") as client:
            slow = asyncio.create_task(client.post("/api/v1/estimate", json=_body("org/slow")))
            await asyncio.sleep(0.3)  # the slow look-up is under way
            start = time.monotonic()
            quick = await client.post("/api/v1/estimate", json=_body("meta-llama/Llama-2-7b-hf"))
            elapsed, slow_done = time.monotonic() - start, slow.done()
            assert (await slow).status_code == 504
            return elapsed, slow_done, quick.status_code

    elapsed, slow_done, status = asyncio.run(both())
    assert status == 200
    assert not slow_done, "the catalog estimate was answered only after the Hub look-up ended"
    assert elapsed < 1.0
