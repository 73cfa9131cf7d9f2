"""Test harness only: nothing here runs in a production coordinator or partner node."""
