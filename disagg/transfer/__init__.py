"""KV transfer between prefill and decode workers (see ``base`` for the interface)."""
