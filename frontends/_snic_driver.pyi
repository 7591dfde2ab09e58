"""Type stub of the smart NIC driver's loops in C (``native/snic_driver.c``); see ``smartnic_driver.py``."""

from typing import Any

def check_frames(frames: list[Any], min_len: int, max_len: int, /) -> int: ...
def stage_tx(
    frames: list[Any],
    start: int,
    mem: Any,
    pool_gpa: int,
    buf_size: int,
    free: list[int],
    outstanding: bytearray,
    /,
) -> tuple[bytes, int, int]: ...
def reap_tx(cmpls: bytes, outstanding: bytearray, free: list[int], /) -> tuple[int, int, list[int]]: ...
def reap_rx(
    cmpls: bytes, mem: Any, pool_gpa: int, buf_size: int, nr_tx: int, posted: bytearray, room: int, /
) -> tuple[list[bytes], bytes, int, list[int], int, int]: ...
