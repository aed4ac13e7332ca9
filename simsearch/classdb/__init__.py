"""The class store: a persisted estimator with its model identity and threshold, its files, search and commands."""
