"""Integrations with tools outside Ray, e.g. annotation tools (`label_studio`)."""
