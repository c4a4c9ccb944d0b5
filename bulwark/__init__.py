"""Bulwark: an email security gateway as an event-sourced pipeline on Apache Kafka."""
