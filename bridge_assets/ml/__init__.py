"""Training rounds and their MLflow tracking and registry (no Dagster, no Ray)."""
