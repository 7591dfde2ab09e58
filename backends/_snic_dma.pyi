"""Type stub of the smart NIC's DMA loops in C (``native/snic_dma.c``); see ``smartnic_dma.py``."""

from typing import Any

def tx_batch(
    descs: bytes, mem: Any, pool_base: int, pool_size: int, pool_count: int, start: int, /
) -> tuple[list[bytes], bytes, int, int, int, int, int]: ...
def rx_batch(
    descs: bytes, frames: list[bytes], mem: Any, pool_base: int, pool_size: int, pool_count: int, /
) -> tuple[bytes, int, int, int, int, int, int, int, int]: ...
