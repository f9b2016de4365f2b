"""Test helpers, not tests: synthetic raw datasets (``synthetic_cases``), the callbacks `organseg fit`
subprocesses load by class path (``probes``, ``slurm_probe``; the tests put ``tests/`` on their
PYTHONPATH) and a throw-away one-node SLURM cluster (``slurm_cluster``).

pytest puts ``tests/`` on ``sys.path`` (its test modules are in no package; default ``prepend`` import
mode), so tests import them as ``from helpers.<module> import ...``."""
