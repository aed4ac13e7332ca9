"""The estimator family: class vectors over additive statistics (scikit-learn API), their choices and baselines."""
