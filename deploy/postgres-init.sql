-- The second database: MLflow's tracking store and model registry (POSTGRES_DB is Dagster's).
CREATE DATABASE mlflow;
