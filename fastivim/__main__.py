"""``python -m fastivim``: the ``fastivim`` command (same as the console script)."""

from .cli.main import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="fastivim")
