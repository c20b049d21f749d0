"""Text data: a corpus (``.txt``, one text a line, or ``.jsonl`` with ``text`` and optional ``label``)
tokenised by a tokenizer from a local directory into ``input_ids`` and ``attention_mask``.

Tokenisation is cached by content (corpus bytes, tokenizer file, length): a cached file can only
be the tokens of these very inputs, so it never goes stale. Splits are seeded like every dataset.
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
from torchshrink.io import atomic_path

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
_CACHE_VERSION = "1"
_PAD_TOKENS = ("[PAD]", "<pad>", "<|padding|>")

__all__ = ["load_text", "read_corpus"]


def read_corpus(path: Path) -> tuple[list[str], list[Any] | None]:
    """The texts of ``path`` and their labels (None when the corpus has none)."""
    if not path.is_file():
        raise MissingFileError(path, "text corpus")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    if path.suffix == ".txt":
        texts = [line.strip() for line in lines if line.strip()]
        labels = None
    elif path.suffix == ".jsonl":
        texts, given = [], []
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
        with_label = [g is not None for g in given]
        if any(with_label) and not all(with_label):
            missing = with_label.index(False) if with_label[0] else with_label.index(True)
            raise DataError(
                f'{path}: some lines have a "label" and some do not (first differing text: #{missing + 1}); '
                "label every line or none"
            )
        labels = given if given and all(with_label) else None
    else:
        raise DataError(
            f"{path}: a text corpus is a .txt file (one text a line) or .jsonl; got {path.suffix!r}"
        )
    if len(texts) < 2:
        raise DataError(f"{path}: needs at least 2 texts, found {len(texts)}")
    return texts, labels


def _class_indices(labels: list[Any], path: Path) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels as they are; string labels become indices into their sorted names."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        return np.asarray(labels, dtype=np.int64), None
    if all(isinstance(v, str) for v in labels):
        names = sorted(set(labels))
        index = {n: i for i, n in enumerate(names)}
        return np.asarray([index[v] for v in labels], dtype=np.int64), names
    raise DataError(f"{path}: labels must be all integers or all strings")


def _tokenizer(directory: Path) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise DataError("data.tokenizer needs the tokenizers package: pip install 'torchshrink[hf]'") from exc
    if not directory.is_dir():
        raise MissingFileError(directory, "tokenizer directory")
    file = directory / TOKENIZER_FILE
    if not file.is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise DataError(
            f"{directory}: tokenizer directory has no {TOKENIZER_FILE} (a fast tokenizer, as transformers' "
            f"save_pretrained writes it); it holds {found[:12]}"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust tokenizer raises its own exception type
        raise DataError(f"{file}: not a readable tokenizer: {exc}") from exc


def _pad_id(tokenizer: Any, directory: Path) -> int:
    if tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    for token in _PAD_TOKENS:
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    raise DataError(f"{directory}: the tokenizer names no padding token ({', '.join(_PAD_TOKENS)})")


def _tokenise(texts: list[str], directory: Path, max_length: int) -> tuple[dict[str, np.ndarray], int]:
    """``input_ids`` and ``attention_mask`` of every text, cut and padded to ``max_length``."""
    tokenizer = _tokenizer(directory)
    pad_id = _pad_id(tokenizer, directory)
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id)
    encoded = tokenizer.encode_batch(texts)
    ids = np.asarray([e.ids for e in encoded], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encoded], dtype=np.int64)
    cut = sum(len(e.overflowing) > 0 for e in encoded)
    if cut:
        log.info("%d of %d texts were cut to max_length %d tokens", cut, len(texts), max_length)
    return {"input_ids": ids, "attention_mask": mask}, int(tokenizer.get_vocab_size())


def _cache_key(corpus: Path, tokenizer: Path, max_length: int) -> str:
    digest = hashlib.sha256(_CACHE_VERSION.encode())
    for file in (corpus, tokenizer / TOKENIZER_FILE):
        digest.update(file.read_bytes())
    digest.update(str(max_length).encode())
    return digest.hexdigest()[:20]


def _cached_tokens(
    texts: list[str], corpus: Path, tokenizer: Path, max_length: int, cache_dir: Path | None
) -> tuple[dict[str, np.ndarray], int]:
    """The tokens, read from ``cache_dir`` when these inputs were tokenised before, else made and kept."""
    if cache_dir is None:
        return _tokenise(texts, tokenizer, max_length)
    _tokenizer(tokenizer)  # a missing or broken tokenizer is named before any hashing
    path = cache_dir / f"tokens-{_cache_key(corpus, tokenizer, max_length)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                columns = {k: cached[k] for k in TEXT_INPUTS}
                vocab = int(cached["vocab_size"])
            log.info("tokens of %s read from the cache %s", corpus.name, path)
            return columns, vocab
        except (zipfile.BadZipFile, ValueError, OSError, KeyError) as exc:
            log.warning("token cache %s is unreadable (%s); tokenising again", path, exc)
    columns, vocab = _tokenise(texts, tokenizer, max_length)
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
    corpus, tokenizer = Path(corpus), Path(tokenizer)
    texts, labels = read_corpus(corpus)
    columns, vocab = _cached_tokens(
        texts, corpus, tokenizer, max_length, Path(cache_dir) if cache_dir is not None else None
    )
    ranges = {"input_ids": (0, vocab), "attention_mask": (0, 2)}
    if labels is None:
        return make_unlabelled_bundle(
            corpus.stem, columns, test_fraction=test_fraction, seed=seed, input_ranges=ranges
        )
    y, _ = _class_indices(labels, corpus)
    return make_bundle(corpus.stem, columns, y, test_fraction=test_fraction, seed=seed, input_ranges=ranges)
