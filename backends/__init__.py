"""backends: dom0-side and monitor-side drivers (netback, the virtual switch, device models)."""
