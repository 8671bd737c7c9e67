"""The simulated fleet of benchmarks/agents_scale.py: many light agents served by worker
processes (:mod:`.light_agents`) and the coordinator side in a process of its own
(:mod:`.coordinator_side`), each driven by the orchestrator over control lines
(:mod:`.control`); :mod:`.results` turns their records into medians, slopes and tables."""
