"""The hypervisor core: domains and their memory, event channels, grant tables, the hypercall
table, the I/O bus for emulated devices, and the counters.

The core imports only :mod:`pvio.abi`, :mod:`pvio.ringbuf` and :mod:`pvio.xenstore`: drivers,
device models and guest kinds sit above it and plug in through its interfaces (``IoBus``
devices, ``GuestKernel``, entry points).  ``docs/architecture.md`` has the rooms.
"""
