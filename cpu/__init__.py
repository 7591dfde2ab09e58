"""cpu: the emulated x86-64 vCPU that runs x86 guest kernels."""
