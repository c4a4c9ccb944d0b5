"""Bulwark's events and topics: the contract between every stage."""
