"""The clients under test. Each runs in its own subprocess: ``python -m bench.clients.<name> SPEC.json``."""
