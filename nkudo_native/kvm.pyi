from collections.abc import Sequence
from os import PathLike

def probe(
    path: str | bytes | PathLike[str], caps: Sequence[int], create_vm: bool
) -> tuple[int, int, tuple[int, ...], int, int]: ...
def smoke(
    path: str | bytes | PathLike[str],
) -> tuple[str, int, tuple[int, ...], tuple[int, int, int, int]]: ...
