"""Exit codes of the `iqray` jobs (README "Exit codes"; `iqray --help`). No imports, so
the CLI can print them without loading the pipeline."""

EXIT_OK = 0  # every input row is in the output, as a scored row or an error row
EXIT_BUG = 1  # a bug (traceback in a file the last line names), or an error after commits
EXIT_USAGE = 2  # usage or configuration mistake: nothing was written
EXIT_ERROR_BUDGET = 3  # more rows failed than --max-error-fraction allows
EXIT_UNFINISHED = 4  # shards left unfinished (storage kept failing): rerun to finish
EXIT_INTERRUPTED = 130  # Ctrl-C: committed shards kept, a rerun resumes
EXIT_CODES_HELP = (
    "exit codes: 0 every input row is in the output (scored or an error row); 1 a bug (its "
    "traceback file is named) or an error after this run committed files (they are kept); "
    "2 usage or configuration mistake, nothing written; 3 error budget exceeded; 4 shards left "
    "unfinished (storage kept failing), nothing half-done committed: rerun to finish; "
    "130 interrupted")
