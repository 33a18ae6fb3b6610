"""Data-folder resolution, calibration batches and calibration-file reading (on small fake data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quark.torch.evaluation import (
    calibration_dataloader,
    calibration_text,
    read_calibration_file,
    shared_data_dir,
)
from quark.torch.evaluation import data as data_mod


class ListTokenizer:
    """Whitespace-separated integers are token ids (ids below 10 never occur in the fake data)."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": ([1] if add_special_tokens else []) + [int(t) for t in text.split()]}


@pytest.fixture
def fake_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "data"
    (root / "wikitext-2").mkdir(parents=True)
    (root / "wikitext-2-raw").mkdir()
    (root / "wikitext-2" / "valid.txt").write_text(" ".join(str(100 + i) for i in range(300)))
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text(" ".join(str(900 + i) for i in range(300)))
    monkeypatch.setenv(data_mod.DATA_DIR_ENV, str(root))
    return root


@pytest.fixture
def read_log(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every file the data module reads."""
    log: list[Path] = []
    original = data_mod._read_text

    def spy(path: Path) -> str:
        log.append(Path(path))
        return original(path)

    monkeypatch.setattr(data_mod, "_read_text", spy)
    return log


def test_env_var_selects_the_data_dir(fake_data_dir: Path) -> None:
    assert shared_data_dir() == fake_data_dir


def test_calibration_reads_only_the_valid_split(fake_data_dir: Path, read_log: list[Path]) -> None:
    calibration_dataloader(ListTokenizer(), num_samples=4, seq_len=25)
    assert read_log == [fake_data_dir / "wikitext-2" / "valid.txt"]
    assert all("wiki.test.raw" not in str(p) and "wikitext-2-raw" not in str(p) for p in read_log)
    assert calibration_text().split()[0] == "100"


def test_calibration_batches_shape_and_content(fake_data_dir: Path) -> None:
    batches = calibration_dataloader(ListTokenizer(), num_samples=4, seq_len=25)
    assert isinstance(batches, list) and len(batches) == 4
    for i, batch in enumerate(batches):
        assert set(batch) == {"input_ids"}
        ids = batch["input_ids"]
        assert ids.shape == (1, 25) and ids.dtype == torch.long
        assert ids[0].tolist() == list(range(100 + 25 * i, 100 + 25 * (i + 1)))  # no BOS, consecutive


def test_calibration_from_given_text_reads_no_file(read_log: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data_mod.DATA_DIR_ENV, "/nonexistent/quark-data")
    batches = calibration_dataloader(ListTokenizer(), num_samples=2, seq_len=3, text="11 12 13 14 15 16 17")
    assert read_log == []
    assert [b["input_ids"].tolist() for b in batches] == [[[11, 12, 13]], [[14, 15, 16]]]


def test_missing_env_dir_error_names_the_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(data_mod.DATA_DIR_ENV, str(missing))
    with pytest.raises(FileNotFoundError) as err:
        shared_data_dir()
    message = str(err.value)
    assert str(missing) in message and data_mod.DATA_DIR_ENV in message
    assert "valid.txt" in message and "wiki.test.raw" in message


def test_default_locations_are_tried_and_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(data_mod.DATA_DIR_ENV, raising=False)
    fake_root = tmp_path / "clone" / "repo"
    fake_root.mkdir(parents=True)
    monkeypatch.setattr(data_mod, "_REPO_ROOT", fake_root)
    with pytest.raises(FileNotFoundError) as err:
        shared_data_dir()
    assert str(tmp_path / "clone" / "shared" / "data") in str(err.value)
    assert str(fake_root / "shared" / "data") in str(err.value)
    # ... and shared/ beside the repository root is found
    beside = tmp_path / "clone" / "shared" / "data"
    (beside / "wikitext-2").mkdir(parents=True)
    (beside / "wikitext-2-raw").mkdir()
    (beside / "wikitext-2" / "valid.txt").write_text("1")
    (beside / "wikitext-2-raw" / "wiki.test.raw").write_text("2")
    assert shared_data_dir() == beside


def test_half_present_data_dir_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "valid.txt").write_text("1 2 3")
    monkeypatch.setenv(data_mod.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="wiki.test.raw"):
        calibration_text()


def test_real_shared_data_is_found_when_present() -> None:
    try:
        root = shared_data_dir()
    except FileNotFoundError:
        pytest.skip("shared data not available here")
    assert (root / "wikitext-2" / "valid.txt").is_file()
    assert (root / "wikitext-2-raw" / "wiki.test.raw").is_file()


def test_read_plain_text_calibration_file(tmp_path: Path) -> None:
    f = tmp_path / "calib.txt"
    f.write_text("hello\nworld\n", encoding="utf-8")
    assert read_calibration_file(f) == "hello\nworld\n"


def test_read_jsonl_calibration_file(tmp_path: Path) -> None:
    f = tmp_path / "calib.jsonl"
    f.write_text("\n".join([json.dumps({"text": "first doc", "id": 1}), "", json.dumps({"text": "second"})]))
    assert read_calibration_file(f) == "first doc\n\nsecond"


@pytest.mark.parametrize(
    "content, match",
    [("{not json}\n", "not valid JSON"), ('{"body": "x"}\n', '"text"'), ("\n\n", "no text")],
)
def test_bad_jsonl_calibration_file(tmp_path: Path, content: str, match: str) -> None:
    f = tmp_path / "calib.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_calibration_file(f)


def test_missing_calibration_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_calibration_file(tmp_path / "missing.txt")
