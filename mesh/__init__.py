"""fleetmesh mesh."""
