"""Releases on the device: install them, keep the previous one, switch atomically.

``slots``: the A/B slot store on disk; ``checks``: what a release must meet here;
``health``: the check a loaded model passes before it serves; ``installer``: the
broker-free decisions of an install (``decision``: what it answers); ``channel``: the
release protocol on any MQTT client; ``deployment``: all of it built together;
``service``: ``takfl-agent serve``'s MQTT side. No torch anywhere.
"""
