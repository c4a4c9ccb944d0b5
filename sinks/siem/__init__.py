"""SIEM formats: each Bulwark event as an ECS document, a CEF line or an RFC 5424 syslog message.

``facts`` says once, for every event type, what a SIEM wants to know (its
kind, category, outcome, severity, addresses and people); each format is a
small module that writes those facts in its own vocabulary. The exporter
(``sinks/export.py``) reads the topics and writes the result.
"""
