"""Fixtures shared by every test module.

Area-specific fixtures live in ``tests/support/`` and are imported where used;
the process cluster (a directory and simulated vLLM nodes) is registered here
because most tier tests need it.
"""

pytest_plugins = ["tests.support.cluster"]
