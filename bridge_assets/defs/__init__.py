"""Dagster definitions by domain: resources, landing, raw data, features."""
