"""Dagster definitions by domain: resources, landing, raw data, features, training, serving."""
