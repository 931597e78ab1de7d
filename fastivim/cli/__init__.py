"""The ``fastivim`` command: a Click group (:mod:`.main`), shared options (:mod:`.options`) and
one module per command. Commands parse options, call the library and print; no maths here.

Commands::

    fastivim run DWI [--bvals FILE] [-o DIR | --bids DERIV --subject 01] [...]
    fastivim dump-defaults > config.yaml
    fastivim simulate OUT.nii.gz
    fastivim demo [--keep]
    fastivim report OUT_DIR
    fastivim batch BIDS_ROOT -o DERIV_DIR

Bad input ends with one line ``Error: <file>: <problem>`` on stderr and exit status 1 (2 for a
malformed command line), never a traceback; nothing is left half-written.
"""

from .main import EXIT_INTERRUPTED, EXIT_TERMINATED, main
from .run import summary_table

__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "main", "summary_table"]
