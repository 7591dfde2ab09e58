"""Every guest-visible ABI, described once: Xen's numbers and layouts (:mod:`pvio.abi.xen`,
re-exported here), and pvio's own device and harness ABIs (:mod:`pvio.abi.emunic`,
:mod:`pvio.abi.smartnic`, :mod:`pvio.abi.bench`).  The x86 guest kernel's C header is
generated from these modules (:mod:`pvio.abi.cheader`), so the two sides cannot disagree.
"""

from pvio.abi.xen import *  # noqa: F403
