"""fleetmesh coordinator."""
