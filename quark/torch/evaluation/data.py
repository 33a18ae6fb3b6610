"""Text sources and token windows for calibration and perplexity evaluation.

The project's shared benchmark protocol (``shared/data/README.md``) is:

* calibration: tokenize ``wikitext-2/valid.txt`` as one string and take the first 32 windows of
  512 tokens (batch size 1);
* evaluation: tokenize ``wikitext-2-raw/wiki.test.raw`` as one string and take the first 40
  non-overlapping windows of 512 tokens, reporting ``exp(mean loss)``.

Keeping the two splits in separate, explicitly named functions is what guarantees calibration never
sees the evaluation text: :func:`calibration_text` only ever opens :func:`calibration_file`.

Tokenization convention (used by both calibration and evaluation, so numbers stay comparable): the
whole text is tokenized *once* with ``add_special_tokens=False``, so **no BOS token is added**,
neither at the start of the stream nor per window; windows are consecutive, non-overlapping slices of
that single token stream.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

DATA_DIR_ENV = "QUARK_DATA_DIR"
"""Environment variable that points at the shared data folder (the one holding ``wikitext-2/``)."""

CALIBRATION_RELPATH = Path("wikitext-2") / "valid.txt"
TEST_RELPATH = Path("wikitext-2-raw") / "wiki.test.raw"

_REPO_ROOT = Path(__file__).resolve().parents[3]


def _candidate_data_dirs() -> list[Path]:
    """Where the shared data may live, in the order they are tried.

    ``$QUARK_DATA_DIR`` wins outright when set (an explicit setting must not silently fall back);
    otherwise ``<repo root>/../shared/data`` (a clone with ``shared/`` beside it, as in CI) and then
    ``<repo root>/shared/data`` (a checkout carrying ``shared/`` inside it).
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return [Path(env).expanduser()]
    return [_REPO_ROOT.parent / "shared" / "data", _REPO_ROOT / "shared" / "data"]


def shared_data_dir() -> Path:
    """Locate the shared benchmark data folder.

    A folder qualifies when it holds both the calibration and the test file, so a half-present copy
    is reported rather than failing later with a confusing message.

    Raises:
        FileNotFoundError: naming every path tried and how to point at the data.
    """
    tried = _candidate_data_dirs()
    for candidate in tried:
        if (candidate / CALIBRATION_RELPATH).is_file() and (candidate / TEST_RELPATH).is_file():
            return candidate
    listing = "\n".join(f"  - {p}" for p in tried)
    raise FileNotFoundError(
        f"Could not find the shared benchmark data (a folder holding {CALIBRATION_RELPATH} and "
        f"{TEST_RELPATH}). Tried:\n{listing}\n"
        f"Set {DATA_DIR_ENV}=/path/to/shared/data, or place shared/data beside the repository root."
    )


def calibration_file() -> Path:
    """Path of the calibration split (``wikitext-2/valid.txt``)."""
    return shared_data_dir() / CALIBRATION_RELPATH


def test_file() -> Path:
    """Path of the evaluation split (``wikitext-2-raw/wiki.test.raw``); never use it to calibrate."""
    return shared_data_dir() / TEST_RELPATH


# Keep pytest from collecting ``test_file`` when a test module imports it by name.
test_file.__test__ = False  # type: ignore[attr-defined]


def _read_text(path: Path) -> str:
    """Read a UTF-8 text file. Every data read in this module goes through here (tests watch it)."""
    return Path(path).read_text(encoding="utf-8")


def calibration_text() -> str:
    """The calibration split as one string."""
    return _read_text(calibration_file())


def test_text() -> str:
    """The evaluation split as one string."""
    return _read_text(test_file())


test_text.__test__ = False  # type: ignore[attr-defined]


def read_calibration_file(path: str | os.PathLike[str]) -> str:
    """Read a user calibration file (``--calib-data FILE``) into one string.

    ``.jsonl`` files hold one JSON object per line with a ``"text"`` field; the texts are joined with
    a blank line between documents. Any other file is read as plain UTF-8 text.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if a ``.jsonl`` line is not a JSON object with a string ``"text"`` field, or the
            file holds no text at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Calibration file not found: {path}")
    raw = _read_text(path)
    if path.suffix.lower() == ".jsonl":
        texts: list[str] = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
            texts.append(record["text"])
        text = "\n\n".join(texts)
    else:
        text = raw
    if not text.strip():
        raise ValueError(f"Calibration file {path} contains no text")
    return text


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize ``text`` as a single string, without special tokens (no BOS), to a 1-D LongTensor."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def token_windows(tokenizer: Any, text: str, seq_len: int, num_windows: int) -> torch.Tensor:
    """The first ``num_windows`` non-overlapping windows of ``seq_len`` tokens of ``text``.

    ``text`` is tokenized once as a whole (no BOS, no per-window special tokens), and window ``i`` is
    tokens ``[i * seq_len, (i + 1) * seq_len)`` of that stream.

    Returns:
        LongTensor of shape ``[num_windows, seq_len]``.

    Raises:
        ValueError: if the arguments are not positive or the text is too short.
    """
    if seq_len <= 0 or num_windows <= 0:
        raise ValueError(f"seq_len and num_windows must be positive, got {seq_len} and {num_windows}")
    ids = tokenize_text(tokenizer, text)
    needed = seq_len * num_windows
    if ids.numel() < needed:
        raise ValueError(
            f"Text has {ids.numel()} tokens, fewer than the {needed} needed for {num_windows} windows "
            f"of {seq_len} tokens"
        )
    return ids[:needed].reshape(num_windows, seq_len)


def calibration_dataloader(
    tokenizer: Any,
    num_samples: int = 32,
    seq_len: int = 512,
    text: str | None = None,
    device: str | torch.device | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches: ``num_samples`` windows of ``seq_len`` tokens, batch size 1.

    Args:
        tokenizer: a Hugging Face tokenizer (anything callable returning ``{"input_ids": [...]}``).
        num_samples: number of windows (the protocol uses 32).
        seq_len: tokens per window (the protocol uses 512).
        text: calibration text; ``None`` means the shared calibration split (never the test split).
        device: where to put the tensors; ``None`` leaves them on the CPU.

    Returns:
        A list of ``{"input_ids": LongTensor[1, seq_len]}`` dicts; a plain list is a valid dataloader.
    """
    if text is None:
        text = calibration_text()
    windows = token_windows(tokenizer, text, seq_len, num_samples)
    if device is not None:
        windows = windows.to(device)
    return [{"input_ids": windows[i : i + 1]} for i in range(num_samples)]
