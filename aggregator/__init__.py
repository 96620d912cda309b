"""The proxy role (open, guard, combine) and the server role (ServerApp and round engines)."""
