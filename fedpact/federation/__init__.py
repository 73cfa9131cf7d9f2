"""Flower apps and job orchestration: composes models, privacy and audit into federated jobs."""
