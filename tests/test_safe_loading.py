"""Safe model loading (issue 8 item 6): safetensors only, remote code never, and a model folder with
a pickle file (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.ckpt``) refused with a clear error —
at ``tuneforge models import``, in the methods' loader (trl_common.load_model_and_tokenizer) and
in the trainer worker, where the refusal reaches the job as its FAILED reason.

The pickles here are hostile: unpickling one creates a marker file, so "never loaded" is checked,
not assumed."""

from __future__ import annotations

import asyncio
import json
import pickle
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from tuneforge import sdk
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.plugins import get_registry
from tuneforge.trainer.model_import import (
    ModelImportError, UnsafeModelError, check_safe_model_dir, import_model,
)
from conftest import REPO_ROOT, workspace

BASE_MODEL = "llama-3.2-1b"


class _Hostile:
    """Unpickling it opens (creates) ``marker`` for writing: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def hostile_pickle(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_Hostile(marker)))
    return path


def test_the_hostile_pickle_is_live(tmp_path):
    """The fixture is real: loading it does run code."""
    marker = tmp_path / "ran"
    pickle.loads(hostile_pickle(tmp_path / "x.pkl", marker).read_bytes())
    assert marker.exists()


def fake_hf_folder(folder: Path, **config) -> Path:
    """A folder shaped like a Hugging Face model (the checks read names, not weights)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "state.pkl", "last.ckpt",
                                  "original/consolidated.00.pth", "TRAINING_ARGS.BIN"])
def test_a_folder_with_a_pickle_file_is_refused(tmp_path, name):
    folder = fake_hf_folder(tmp_path / "model")
    check_safe_model_dir(folder)  # safetensors alone: fine
    marker = tmp_path / "ran"
    hostile_pickle(folder / name, marker)
    with pytest.raises(UnsafeModelError) as info:
        check_safe_model_dir(folder)
    message = str(info.value)
    assert name in message and "pickle" in message and "safetensors only" in message
    assert not marker.exists()


def test_no_safetensors_or_remote_code_is_refused(tmp_path):
    folder = fake_hf_folder(tmp_path / "model")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UnsafeModelError, match=r"no \*\.safetensors weights"):
        check_safe_model_dir(folder)
    remote = fake_hf_folder(tmp_path / "remote", auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (remote / "modeling_x.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UnsafeModelError, match="remote code"):
        check_safe_model_dir(remote)


def test_import_refuses_a_folder_with_a_pickle_file(tmp_path):
    """``tuneforge models import``: one line on stderr, exit 1, nothing written, nothing unpickled
    (the safetensors beside the pickle do not make the folder acceptable)."""
    folder = fake_hf_folder(tmp_path / "hf")
    marker = tmp_path / "ran"
    hostile_pickle(folder / "pytorch_model.bin", marker)
    store = tmp_path / "store"
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "models", "import", BASE_MODEL, str(folder),
                             "--store", str(store)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "pytorch_model.bin" in lines[0] and "pickle" in lines[0] and "remove them" in lines[0], lines[0]
    assert not store.exists() or not any(store.iterdir())
    assert not marker.exists()
    # a pickle in a subfolder (Meta's original/consolidated.00.pth) is refused the same way
    (folder / "pytorch_model.bin").unlink()
    hostile_pickle(folder / "original" / "consolidated.00.pth", marker)
    with pytest.raises(ModelImportError, match=r"original/consolidated\.00\.pth"):
        import_model(get_registry().base_model(BASE_MODEL), folder, store)
    assert not marker.exists()


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    from tuneforge.trainer.standin import make_standin

    return make_standin(get_registry().base_model(BASE_MODEL), tmp_path_factory.mktemp("models"))


def test_the_loader_refuses_a_pickle_and_loads_safetensors(standin, tmp_path, one_torch_thread):
    from tuneforge_builtin.trl_common import Device, RunPaths, load_model_and_tokenizer

    spec = get_registry().base_model(BASE_MODEL)
    context = types.SimpleNamespace(base_model=spec, seed=0)
    device = Device(use_cuda=False, bf16=False)

    def paths(model_dir: Path) -> RunPaths:
        out = tmp_path / "run"
        return RunPaths(model_dir=model_dir, output_dir=out, checkpoint_root=out / "ck", adapter_dir=out / "adapter")

    model, tokenizer = load_model_and_tokenizer(context, paths(standin), device)  # the clean stand-in loads
    assert model.num_parameters() > 0 and tokenizer.chat_template == spec.training_chat_template
    dirty = tmp_path / "dirty"
    shutil.copytree(standin, dirty)
    marker = tmp_path / "ran"
    hostile_pickle(dirty / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeModelError, match="pytorch_model.bin"):
        load_model_and_tokenizer(context, paths(dirty), device)
    assert not marker.exists()


async def test_a_job_on_a_model_dir_with_a_pickle_fails_with_the_reason(services, standin, tmp_path):
    """The trainer worker checks the model store folder before any plugin loads it: the job ends
    FAILED with the refusal as its reason, and the pickle is never unpickled."""
    endpoints, settings = services
    store = settings.resolved_model_store()
    shutil.copytree(standin, store / BASE_MODEL)
    marker = tmp_path / "ran"
    hostile_pickle(store / BASE_MODEL / "pytorch_model.bin", marker)
    clients = await workspace(endpoints)
    try:
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                         {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                                for i in range(24)))
        assert (await sdk.import_file(clients, data)).imported == 24
        job = (await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=js.JobSpec(
            name="pickle-refused", base_model=BASE_MODEL, method="sft",
            hyperparameters=common_pb2.Hyperparameters(min_examples=10, max_epochs=1))))).job
        deadline = time.monotonic() + 60
        while job.state not in (js.JOB_STATE_SUCCEEDED, js.JOB_STATE_FAILED, js.JOB_STATE_CANCELLED):
            assert time.monotonic() < deadline, f"job still {js.JobState.Name(job.state)}"
            await asyncio.sleep(0.2)
            job = (await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=job.id))).job
        assert job.state == js.JOB_STATE_FAILED
        assert "pytorch_model.bin" in job.failure_reason and "pickle" in job.failure_reason, job.failure_reason
        assert "safetensors only" in job.failure_reason
        assert not marker.exists()
    finally:
        await clients.close()
