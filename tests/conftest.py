"""Fixtures shared by every test module.

Area-specific fixtures live in ``tests/support/`` and are imported where used;
the process cluster (a directory and simulated vLLM nodes) is registered here
because most tier tests need it, and the fuzz kit because its session-wide
report (``fuzz_report``) must be one fixture for all the ``test_fuzz_*`` modules.
"""

pytest_plugins = ["tests.support.cluster", "tests.support.fuzz"]
