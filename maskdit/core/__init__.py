"""Infrastructure every step shares: configs, errors, results, storage, ranks, MLflow tracking."""
