"""Type stub of the smart NIC's DMA loops in C (``native/snic_dma.c``); see ``smartnic_dma.py``."""

from typing import Any

def rx_batch(
    descs: bytes, frames: list[bytes], mem: Any, pool_base: int, pool_size: int, pool_count: int, /
) -> tuple[bytes, int, int, int, int, int, int, int, int]: ...

HDR_STRIDE: int

def tx_guest_batch(
    descs: bytes,
    mem: Any,
    pool_base: int,
    pool_size: int,
    pool_count: int,
    start: int,
    frames: Any,
    heads: Any,
    hdrs: Any,
    nf: int,
    /,
) -> tuple[bytes, int, int, int, int, int, int, int]: ...
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
    hdrs: Any = None,
    /,
) -> tuple[bytes, int, int, int, int, int, int, int, int]: ...
def area_bytes(
    area_mem: Any, gfns: Any, frames: Any, idx: Any, n: int, hdrs: Any = None, /
) -> list[bytes]: ...
def area_copy(
    area_mem: Any,
    gfns: Any,
    frames: Any,
    idx: Any,
    n: int,
    hdrs: Any,
    dst: Any,
    dst_frames: Any,
    head: int,
    /,
) -> tuple[int, int, int]: ...
def frame_entries(frames: Any, idx: Any, n: int, /) -> bytes: ...
