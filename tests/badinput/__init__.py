"""Bad-input matrix: user-facing, end-to-end behaviour on malformed config, work and heartbeats."""
