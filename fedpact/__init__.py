"""fedpact: privacy-preserving collaborative propensity and churn modelling."""

__version__ = "0.1.0"
