"""Monitoring (steps 11, 20, 21): profiles of live traffic, drift, decay and the retrain policy.

Dagster-free and Ray-free, like `lake/` and `ml/`; `bridge_assets.defs.monitoring` wires it.
whylogs is imported only through `whylogs_compat` (numpy-2 fix, fast path).
"""
