"""Bundled device profiles (``devices/``) and federation configs (``federations/``)."""
