"""The coordinator service: HTTP API and web console (FastAPI), governance, registry, accounts.

Start it with `fedpact serve`, or build the app with `fedpact.service.api.app.create_app(home)`.
See docs/service.md.
"""
