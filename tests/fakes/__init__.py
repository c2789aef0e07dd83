"""Stand-ins for hardware and GPU tools (never for the code under test)."""
