"""Debian's GRUB for Xen PVH boots on the system-mode vCPU and obeys its console ring.

The quickest end-to-end check of the PVH boot ABI: the 32-bit entry with hvm_start_info,
the hypercall page GRUB names with the (hidden) MSR write, hvm_op params, add_to_physmap,
the memory map, the grant table, xenstore and the console ring in both directions.
"""

from __future__ import annotations

import pvio
from pvio.cpu.linux import GrubGuest
from tests.pvh_support import require


async def test_grub_reaches_its_prompt_and_runs_a_typed_command() -> None:
    require("grub")
    async with pvio.Hypervisor() as hv:
        guest = GrubGuest()
        dom = hv.create_domain(guest, name="grub")
        await hv.start(dom)
        assert await guest.wait_for("Minimal BASH-like line editing", timeout=60)
        assert "Welcome to GRUB!" in dom.console
        # GRUB's terminal waits for a first key before it draws the prompt.
        assert guest.type("\n") == 1
        assert await guest.wait_for("grub>", timeout=30)
        start = len(dom.console)
        assert guest.type("echo hello-from-the-ring\n") == len("echo hello-from-the-ring\n")
        assert await guest.wait_for("\nhello-from-the-ring", timeout=30, start=start)
        c = dom.counters
        assert dom.alive
        assert c["hypercall_page.writes"] == 1  # the MSR write that names the hypercall page was seen
        assert c["hypercalls.hvm_op.get_param"] == 4  # store and console: pfn and event channel each
        assert c["hypercalls.memory_op.add_to_physmap"] == 2  # shared_info and the grant frame
        assert c["hypercalls.memory_op.memory_map"] == 1
        assert c["console.bytes_out"] > 0
        assert c["crashes"] == 0
