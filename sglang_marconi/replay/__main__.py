"""``python -m sglang_marconi.replay`` (console script ``sglang-marconi-replay``)."""

from .runner import main

if __name__ == "__main__":
    raise SystemExit(main())
