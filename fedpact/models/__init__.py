"""Features, torch models, training loops and metrics: plain functions, no federation inside."""
