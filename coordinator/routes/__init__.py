"""The coordinator's HTTP routes, one module per resource; each module's `ROUTES` lists its
paths, and `coordinator._app.build_app` puts them together (docs/api.md, docs/dashboard.md)."""
