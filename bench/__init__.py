"""End-to-end benchmark of the imagegen provider against the bundled gateway: ``python -m bench``.

See ``bench/README.md``.
"""
