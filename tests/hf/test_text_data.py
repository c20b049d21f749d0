"""Text data: a .txt or .jsonl corpus tokenised by a local tokenizer into input_ids + attention_mask,
seeded splits, a content-keyed cache, and named errors for what is missing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import MAX_LENGTH

from torchshrink.data import load_data, text
from torchshrink.errors import DataError, MissingFileError


def _spec(corpus, tokenizer, **extra) -> dict:
    return {"text": str(corpus), "tokenizer": str(tokenizer), "max_length": MAX_LENGTH, **extra}


def test_a_corpus_becomes_token_ids_and_masks(corpus, tokenizer_dir) -> None:
    data = load_data(_spec(corpus, tokenizer_dir))
    assert data.input_names == ("input_ids", "attention_mask") and not data.labelled
    ids, mask = data.train.tensors[0]
    assert ids.dtype == torch.int64 and ids.shape[1] == MAX_LENGTH and mask.shape == ids.shape
    assert len(data.train) + len(data.test) == 120
    spec = data.inputs
    assert (spec.fields[0].low, spec.fields[0].high) == (0, 30522)  # the tokenizer's vocabulary
    assert (spec.fields[1].low, spec.fields[1].high) == (0, 2)
    assert spec.onnx_axes()["input_ids"] == {0: "batch", 1: "sequence"}
    # a real tokenisation: [CLS] first, padding masked out, the same texts split the same way
    assert bool((ids[:, 0] == 101).all()) and bool(((ids == 0) == (mask == 0)).all())
    again = load_data(_spec(corpus, tokenizer_dir))
    assert torch.equal(again.test.tensors[0][0], data.test.tensors[0][0])
    other = load_data(_spec(corpus, tokenizer_dir, split_seed=1))
    assert not torch.equal(other.test.tensors[0][0], data.test.tensors[0][0])


def test_tokens_are_cached_by_content(corpus, tokenizer_dir, tmp_path, monkeypatch) -> None:
    first = load_data(_spec(corpus, tokenizer_dir), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 1

    def no_tokenising(*_a, **_k):
        raise AssertionError("tokenised again although the cache holds these tokens")

    monkeypatch.setattr(text, "_tokenise", no_tokenising)
    cached = load_data(_spec(corpus, tokenizer_dir), cache_dir=tmp_path)
    assert torch.equal(cached.train.tensors[0][0], first.train.tensors[0][0])
    changed = tmp_path / "changed.txt"
    changed.write_text(corpus.read_text() + "One more sentence that changes the corpus.\n")
    with pytest.raises(AssertionError, match="tokenised again"):  # new content: a new cache entry
        load_data(_spec(changed, tokenizer_dir), cache_dir=tmp_path)


def test_jsonl_labels_make_a_labelled_dataset(tmp_path, tokenizer_dir) -> None:
    rows = [
        {"text": f"sentence number {i} is {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
        for i in range(40)
    ]
    path = tmp_path / "labelled.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_data(_spec(path, tokenizer_dir))
    assert data.labelled and data.num_classes == 2
    labels = np.concatenate([data.train.tensors[1].numpy(), data.test.tensors[1].numpy()])
    assert sorted(np.bincount(labels)) == [20, 20]  # "neg" -> 0, "pos" -> 1, stratified split


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("mixed.jsonl", '{"text": "a first text here", "label": 1}\n{"text": "a second text"}\n',
         'some lines have a "label" and some do not'),
        ("broken.jsonl", '{"text": "fine"}\n{"txt": "no text key"}\n', r"line 2: needs a \"text\" string"),
        ("texts.csv", "text,label\nhello,1\n", r"a text corpus is a .txt file \(one text a line\) or .jsonl"),
    ],
)  # fmt: skip
def test_bad_corpus_files_are_named(name, content, message, tmp_path, tokenizer_dir) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_data(_spec(path, tokenizer_dir))


def test_a_missing_tokenizer_is_named(tmp_path, corpus) -> None:
    with pytest.raises(MissingFileError, match="tokenizer directory"):
        load_data(_spec(corpus, tmp_path / "nowhere"))
    with pytest.raises(DataError, match="has no tokenizer.json"):
        load_data(_spec(corpus, tmp_path))


def test_jsonl_lines_split_on_newlines_only(tmp_path, tokenizer_dir) -> None:
    path = tmp_path / "odd.jsonl"
    rows = ['{"text": "a line separator \u2028 inside a JSON string"}', "", '{"text": "and a second text"}']
    path.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")  # with a byte-order mark
    data = load_data(_spec(path, tokenizer_dir))
    assert len(data.train) + len(data.test) == 2
    path.write_text('{"text": "one", "label": 1}\n\n{"text": "two"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="odd.jsonl, line 3: some lines have a"):  # file line, not text index
        load_data(_spec(path, tokenizer_dir))
