"""fleetmesh agent."""
