"""The HTTP teacher against a real OpenAI-compatible server: `transformers serve` (the
`serving` extra: fastapi + uvicorn) serving the tiny test model on 127.0.0.1, offline; then
`safer synth` end to end through that endpoint in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from safer_dist.synth.teachers import HttpTeacher

SERVE = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """(base_url, model name) of `transformers serve` on loopback; stopped after the module."""
    tmp = tmp_path_factory.mktemp("serve")
    # synth's system prompt (the rulebook) is ~1,230 tokens in the test tokenizer, more than the
    # test model's 1,024 positions; transformers serve (5.25 on) refuses prompt + answer beyond
    # max_position_embeddings with HTTP 400. The model is RoPE-based (no position table), so a
    # copy that declares 4,096 positions serves the same weights.
    model_dir = tmp / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp / "hub"), TRANSFORMERS_VERBOSITY="error")
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu", "--dtype", "float32"], stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    deadline = time.monotonic() + 180
    try:
        while True:  # poll /health until it answers, the server exits, or the deadline passes
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            try:
                proc.wait(timeout=0.25)
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n{(tmp / 'serve.log').read_text()[-3000:]}")
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not ready after 180 s:\n{(tmp / 'serve.log').read_text()[-3000:]}")
        yield f"http://127.0.0.1:{port}/v1", str(model_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_http_teacher_against_transformers_serve(served):
    url, model = served
    t = HttpTeacher(url, model, max_concurrency=2, timeout_s=60, max_retries=1, backoff_s=0.1)
    outs = t.generate(["How do I bake bread?", "Write a poem about the sea.", "How do I pick a lock?"],
                      max_new_tokens=12, temperature=0.0)
    assert all(o.error is None and isinstance(o.text, str) and o.attempts == 1 for o in outs), outs
    assert all(o.num_tokens is not None and 0 < o.num_tokens <= 12 for o in outs)
    # A model the server does not hold is a client error: reported per prompt, not retried.
    wrong = HttpTeacher(url, str(model) + "-missing", max_retries=3, backoff_s=0.0, timeout_s=60)
    (bad,) = wrong.generate(["x"], max_new_tokens=4, temperature=0.0)
    assert bad.text is None and bad.error


def test_safer_synth_through_the_endpoint(served, demo_data_dir, tmp_path):
    url, model = served
    out = tmp_path / "synth"
    cmd = [sys.executable, "-m", "launcher", "synth", "configs/tiny.yaml", "synth.teacher=http",
           f"synth.base_url={url}", f"synth.model_name={model}", f"synth.prompts={demo_data_dir / 'erpo_prompts.jsonl'}",
           "synth.max_prompts=4", "synth.max_new_tokens=24", "synth.max_concurrency=2", f"synth.out_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all runs: 0 accepted, 4 rejected of 4" in proc.stdout, proc.stdout
    assert "rejected invalid_format" in proc.stdout
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 4 and all(r["teacher"] == f"http:{model}" for r in rejects)
    assert json.loads((out / "summary.json").read_text())["rejected_by_reason"] == {"invalid_format": 4}
