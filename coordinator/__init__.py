"""The fleetmesh coordinator server: API, store, peer maps, relay hub, releases. Operator tools
(the SDK, the `fleetmesh` CLI, publishing) live in `ops`, which this package never imports."""
