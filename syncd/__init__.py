"""syncd: watch any HTTP API and send signed webhooks for every record added, changed or removed."""

__version__ = "0.1.0"
