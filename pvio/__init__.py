"""pvio: a Xen-style split-driver paravirtual I/O framework with a virtual NIC."""

__version__ = "0.1.0"
