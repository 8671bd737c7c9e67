"""The edge agent: the service on a device.

It trains or fine-tunes its prototype's model on local data, exchanges updates with
the coordinator over MQTT and runs exported models for inference, all governed by a
device profile (``takfl.config.DeviceProfile``). The command line is ``takfl-agent``
(``edge_agent.cli``). Heavy dependencies are imported where they are used.
"""
