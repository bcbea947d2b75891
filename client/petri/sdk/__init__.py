"""The Python SDK of petri; import its names from ``petri`` (e.g. ``petri.Sandbox``)."""
