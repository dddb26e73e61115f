"""The prediction service: a Ray Serve application hosting the Production model (steps 7–10)."""
