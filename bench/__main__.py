"""``python -m bench``: run every benchmark table and rewrite its section of docs/benchmarks.md."""

from __future__ import annotations

import logging

from bench import b0_reference


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    b0_reference.run()


if __name__ == "__main__":
    main()
