"""Model releases from the coordinator to the devices (``takfl-coordinator release``,
``rollback``).

    build.py     a run's verified exports -> signed releases (reference outputs included)
    publish.py   signing, storing, rollback releases; the releases a command offers
    store.py     RUN/releases: metadata, content-addressed blobs, rollout records
    stages.py    --stages / --abort-above parsed, devices planned into stages
    records.py   device and rollout states, the per-device record
    rollout.py   the staged-rollout state machine (pure: no broker, no files, no clock)
    control.py   the release desk: reports in, signed offers out (no broker)
    service.py   the MQTT end: routes, publishes; its own broker login
    command.py   the two commands wired together (run dir, registry, key, broker)
    summary.py   what status and the report show; tables.py prints it

The device side (install, health check, A/B slots, local inference) is ``edge_agent``'s;
both follow ``takfl.release`` (metadata, keys, reference) and ``takfl.wire.release``.
"""
