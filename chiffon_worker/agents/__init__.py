"""Agents: what runs on a host, owns its identity and builds its snapshot."""
