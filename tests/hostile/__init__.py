"""Hostile and unlucky input, one table-driven module per area (issue 12).

``cases.py`` holds the operator-level cases (a real ``kotonoha`` process each); their
messages are the "what happens when…" table of docs/OPERATIONS.md, which
``python -m tests.hostile.document`` rewrites from real runs and
``test_operations_table_matches_the_runs`` keeps honest.
"""
