"""Text data: a corpus (``.txt``, one text a line, or ``.jsonl`` with ``text`` and optional ``label``)
tokenised by a tokenizer from a local directory into ``input_ids`` and ``attention_mask``.

Tokenisation is cached by content (the texts, the tokenizer file, the length): a cached file can
only be the tokens of these very inputs, so it never goes stale. Splits are seeded like every dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from torchshrink.data.bundle import DatasetBundle, make_bundle, make_unlabelled_bundle
from torchshrink.errors import DataError, MissingFileError
from torchshrink.inputs import TEXT_INPUTS
from torchshrink.io import atomic_path, folder_listing

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
_CACHE_VERSION = "1"
_PAD_TOKENS = ("[PAD]", "<pad>", "<|padding|>")

__all__ = ["load_text", "read_corpus"]


def _lines(path: Path) -> list[str]:
    """The file's lines split on newlines only (JSON strings may hold U+2028 and the like), BOM dropped."""
    if not path.is_file():
        raise MissingFileError(path, "text corpus")
    try:
        return path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc


def read_corpus(path: Path) -> tuple[list[str], list[Any] | None]:
    """The texts of ``path`` and their labels (None when the corpus has none)."""
    if path.suffix not in (".txt", ".jsonl"):
        raise DataError(
            f"{path}: a text corpus is a .txt file (one text a line) or .jsonl; got {path.suffix!r}"
        )
    lines = _lines(path)
    if path.suffix == ".txt":
        texts, labels = [line.strip() for line in lines if line.strip()], None
    else:
        texts, given, numbers = [], [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not a JSON object ({exc.msg})") from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(
                    f'{path}, line {number}: needs a "text" string, e.g. {{"text": "...", "label": 0}}'
                )
            texts.append(row["text"])
            given.append(row.get("label"))
            numbers.append(number)
        has = [g is not None for g in given]
        if any(has) and not all(has):
            differing = numbers[has.index(not has[0])]
            raise DataError(
                f'{path}, line {differing}: some lines have a "label" and some do not; label every line or none'
            )
        labels = given if given and all(has) else None
    if len(texts) < 2:
        raise DataError(f"{path}: needs at least 2 texts, found {len(texts)}")
    return texts, labels


def _class_indices(labels: list[Any], path: Path) -> np.ndarray:
    """String labels become indices into their sorted names; integers stay (``make_bundle`` checks them)."""
    if all(isinstance(v, str) for v in labels):
        index = {n: i for i, n in enumerate(sorted(set(labels)))}
        return np.asarray([index[v] for v in labels], dtype=np.int64)
    if any(isinstance(v, (str, bool)) or not isinstance(v, (int, float)) for v in labels):
        raise DataError(f"{path}: labels must be all integers or all strings")
    return np.asarray(labels)


def _tokenizer_file(directory: Path) -> Path:
    """``directory``'s tokenizer file, with a named error when the folder or the file is missing."""
    if not directory.is_dir():
        raise MissingFileError(directory, "tokenizer directory")
    file = directory / TOKENIZER_FILE
    if not file.is_file():
        raise DataError(
            f"{directory}: tokenizer directory has no {TOKENIZER_FILE} (a fast tokenizer, as transformers' "
            f"save_pretrained writes it); it holds {folder_listing(directory)}"
        )
    return file


def _tokenise(texts: list[str], file: Path, max_length: int) -> tuple[dict[str, np.ndarray], int]:
    """``input_ids`` and ``attention_mask`` of every text, cut and padded to ``max_length``, and the
    vocabulary size."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise DataError("data.tokenizer needs the tokenizers package: pip install 'torchshrink[hf]'") from exc
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust tokenizer raises its own exception type
        raise DataError(f"{file}: not a readable tokenizer: {exc}") from exc
    pad_id = _pad_id(tokenizer, file)
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id)
    encoded = tokenizer.encode_batch(texts)
    columns = {
        "input_ids": np.asarray([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in encoded], dtype=np.int64),
    }
    cut = sum(len(e.overflowing) > 0 for e in encoded)
    if cut:
        log.info("%d of %d texts were cut to max_length %d tokens", cut, len(texts), max_length)
    return columns, int(tokenizer.get_vocab_size())


def _pad_id(tokenizer: Any, file: Path) -> int:
    if tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    for token in _PAD_TOKENS:
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    raise DataError(f"{file}: the tokenizer names no padding token ({', '.join(_PAD_TOKENS)})")


def _cache_key(texts: list[str], file: Path, max_length: int) -> str:
    digest = hashlib.sha256(_CACHE_VERSION.encode())
    digest.update(json.dumps(texts).encode())
    digest.update(file.read_bytes())
    digest.update(str(max_length).encode())
    return digest.hexdigest()[:20]


def _cached_tokens(
    texts: list[str], file: Path, max_length: int, cache_dir: Path | None
) -> tuple[dict[str, np.ndarray], int]:
    """The tokens, read from ``cache_dir`` when these inputs were tokenised before, else made and kept."""
    if cache_dir is None:
        return _tokenise(texts, file, max_length)
    path = cache_dir / f"tokens-{_cache_key(texts, file, max_length)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                columns = {k: cached[k] for k in TEXT_INPUTS}
                vocab = int(cached["vocab_size"])
            log.info("tokens read from the cache %s", path)
            return columns, vocab
        except (zipfile.BadZipFile, ValueError, OSError, KeyError) as exc:
            log.warning("token cache %s is unreadable (%s); tokenising again", path, exc)
    columns, vocab = _tokenise(texts, file, max_length)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez(f, vocab_size=np.int64(vocab), **columns)
    return columns, vocab


def load_text(
    corpus: str | Path,
    tokenizer: str | Path,
    *,
    max_length: int = 128,
    test_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> DatasetBundle:
    """A dataset of tokenised texts: inputs ``input_ids`` (range [0, vocabulary)) and
    ``attention_mask``; labelled when every ``.jsonl`` line has a ``label``."""
    corpus = Path(corpus)
    texts, labels = read_corpus(corpus)
    file = _tokenizer_file(Path(tokenizer))
    columns, vocab = _cached_tokens(
        texts, file, max_length, Path(cache_dir) if cache_dir is not None else None
    )
    ranges = {"input_ids": (0, vocab), "attention_mask": (0, 2)}
    if labels is None:
        return make_unlabelled_bundle(
            corpus.stem, columns, test_fraction=test_fraction, seed=seed, input_ranges=ranges
        )
    y = _class_indices(labels, corpus)
    return make_bundle(corpus.stem, columns, y, test_fraction=test_fraction, seed=seed, input_ranges=ranges)
