"""``python -m fastivim.cli``: the ``fastivim`` command."""

from .main import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="fastivim")
