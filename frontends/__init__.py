"""frontends: guest-side drivers (the Python netfront; the x86 guest kernel's C sources)."""
