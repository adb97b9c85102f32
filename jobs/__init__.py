"""iqray.jobs: the ``iqray`` command line and one pydantic config per job. Kept thin."""
