"""iqray.pipeline.tables: the dataset jobs' table work (filter, preferences, report, clean's
joins), on the driver in pyarrow. They read score runs back and handle score columns only:
imports neither Ray nor torch."""
