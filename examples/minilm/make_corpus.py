"""Write corpus.txt: English sentences taken from the long descriptions of the installed Python
packages' metadata and from the Python language reference that every Python ships
(``pydoc_data.topics``): an offline text corpus; the committed corpus.txt was made by this script.

    python examples/minilm/make_corpus.py examples/minilm/corpus.txt --limit 2000
"""

from __future__ import annotations

import argparse
import importlib.metadata
import random
import re
from pathlib import Path

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MARKUP = re.compile(r"[`|<>{}\[\]#=*_/\\~^$@]|https?:|\.\.|::")


def _texts() -> list[str]:
    """Package descriptions, then the language reference's topics."""
    from pydoc_data.topics import topics

    described = [
        dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        for dist in importlib.metadata.distributions()
    ]
    return described + [topics[k] for k in sorted(topics)]


def sentences() -> list[str]:
    """Plain prose sentences of 40-300 characters, without markup, links or code."""
    found: set[str] = set()
    for text in _texts():
        for piece in _SENTENCE_END.split(text):
            sentence = " ".join(piece.split())
            if 40 <= len(sentence) <= 300 and sentence[0].isupper() and not _MARKUP.search(sentence):
                found.add(sentence)
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    texts = sentences()
    random.Random(args.seed).shuffle(texts)
    args.out.write_text("\n".join(texts[: args.limit]) + "\n", encoding="utf-8")
    print(f"{args.out}: {min(len(texts), args.limit)} of {len(texts)} sentences")


if __name__ == "__main__":
    main()
