"""The MLflow Model Registry: what a registered model carries, the champion gate, the register step."""
