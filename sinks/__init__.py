"""Sinks: act on the outside world (delivery, quarantine) from the verdict topic."""
