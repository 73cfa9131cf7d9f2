"""The service layer: command line (and later HTTP API and web console) over the other packages."""
