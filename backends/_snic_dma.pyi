"""Type stub of the smart NIC's DMA loops in C (``native/snic_dma.c``); see ``smartnic_dma.py``."""

from typing import Any

def rx_batch(
    descs: bytes, frames: list[bytes], mem: Any, pool_base: int, pool_size: int, pool_count: int, /
) -> tuple[bytes, int, int, int, int, int, int, int, int]: ...
def tx_area_batch(
    descs: bytes,
    mem: Any,
    pool_base: int,
    pool_size: int,
    pool_count: int,
    start: int,
    area: Any,
    frames: Any,
    nf: int,
    head: int,
    /,
) -> tuple[bytes, int, int, int, int, int, int, int, int]: ...
def rx_area_batch(
    descs: bytes,
    area_mem: Any,
    gfns: Any,
    frames: Any,
    idx: Any,
    n: int,
    mem: Any,
    pool_base: int,
    pool_size: int,
    pool_count: int,
    /,
) -> tuple[bytes, int, int, int, int, int, int, int, int]: ...
def area_bytes(area_mem: Any, gfns: Any, frames: Any, idx: Any, n: int, /) -> list[bytes]: ...
def frame_entries(frames: Any, idx: Any, n: int, /) -> bytes: ...
