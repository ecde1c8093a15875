"""fleetmesh operator tools: the coordinator SDK (client), the `fleetmesh` command line and
release publishing. The server lives in `coordinator`, which imports nothing from here."""
