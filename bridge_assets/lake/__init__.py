"""The data lake: object storage, its layout, landing of batches and versioned feature tables.

Plain Python (no Dagster, no Ray), so CLIs, subprocesses and notebooks share it.
"""
