"""Sharded writing, atomic output folders, and clear errors for broken checkpoints."""

import json

import pytest
import torch

from quark.torch import LLMTemplate
from quark.torch.export import writing as export_writing
from quark.torch.export.api import export_safetensors, import_model_from_safetensors
from quark.torch.export.safetensors_io import (
    INDEX_NAME,
    CheckpointError,
    atomic_directory,
    load_tensors,
    parse_size,
    write_shards,
)
from quark.torch.quantization.api import ModelQuantizer
from tests.helpers import tiny_llama


def test_parse_size():
    assert parse_size("50GB") == 50 * 10**9
    assert parse_size("5GiB") == 5 * 2**30
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def test_shards_respect_the_size_and_the_index_maps_every_tensor(tmp_path):
    tensors = [(f"t{i}", torch.full((100,), float(i))) for i in range(10)]  # 400 bytes each
    tensors.append(("big", torch.zeros(1000)))  # larger than a shard: alone in its own
    tensors.append(("view", torch.arange(10.0)[2:5]))  # a view of a larger buffer is copied
    index = write_shards(tensors, tmp_path, max_shard_size=1000)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-00007.safetensors" for i in range(1, 8)]
    assert index["weight_map"]["t0"] == index["weight_map"]["t1"] == files[0]
    assert index["weight_map"]["big"] not in {index["weight_map"][f"t{i}"] for i in range(10)}
    assert index["metadata"]["total_size"] == 10 * 400 + 4000 + 12
    assert json.loads((tmp_path / INDEX_NAME).read_text()) == index
    back = load_tensors(tmp_path)
    assert set(back) == {n for n, _ in tensors}
    assert all(torch.equal(back[n], t) for n, t in tensors)


def test_duplicate_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        write_shards([("a", torch.zeros(1)), ("a", torch.ones(1))], tmp_path)


def test_atomic_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_directory(out):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.txt").read_text() == "old"
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty) as tmp:  # an empty folder is not "existing output"
        (tmp / "a").write_text("a")
    assert (empty / "a").is_file()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "out"
    model = tiny_llama()
    ModelQuantizer(LLMTemplate.get("llama").get_config("uint4_wo_32")).quantize_model(model, progress=False)
    export_safetensors(model, folder, max_shard_size=100_000)
    return folder, model


def test_sharded_export_imports(exported):
    folder, model = exported
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    back = import_model_from_safetensors(None, folder)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)


def _copy(folder, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target, sorted(target.glob("model-*.safetensors"))[-1]


def test_corrupt_shard_is_named(exported, tmp_path):
    folder, _ = _copy(exported[0], tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit in the tensor data: only the checksum sees it
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=shard.name + ".*checksum"):
        import_model_from_safetensors(None, folder)


def test_truncated_shard_is_named(exported, tmp_path):
    folder, shard = _copy(exported[0], tmp_path)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=shard.name + ".*truncated or corrupt"):
        import_model_from_safetensors(None, folder, verify=False)


def test_missing_shard_is_named(exported, tmp_path):
    folder, shard = _copy(exported[0], tmp_path)
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name + ".*missing"):
        import_model_from_safetensors(None, folder)


def test_checkpoint_that_does_not_fit_the_architecture(exported, tmp_path):
    folder, _ = _copy(exported[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing.*layers.2"):
        import_model_from_safetensors(None, folder)


def test_existing_output_needs_overwrite_and_a_crash_leaves_nothing(exported, tmp_path, monkeypatch):
    _, model = exported
    out = tmp_path / "out"
    export_safetensors(model, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="not empty"):
        export_safetensors(model, out)

    def crash(tensors, folder, max_shard_size):
        (folder / "model-00001.partial").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export_writing, "write_shards", crash)
    with pytest.raises(OSError, match="disk full"):
        export_safetensors(model, out, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        export_safetensors(model, tmp_path / "new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
