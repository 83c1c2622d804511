from types import TracebackType

class NetlinkSocket:
    def __init__(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> NetlinkSocket: ...
    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None: ...
    def get_link(self, name: str) -> dict[str, object] | None: ...
    def dump_links(self) -> list[dict[str, object]]: ...
    def dump_tap_stats(self) -> list[tuple[int, str, str | None, tuple[int, int, int, int, int, int, int, int]]]: ...
    def set_link(
        self,
        index: int = 0,
        name: str | None = None,
        *,
        up: bool | None = None,
        mtu: int = 0,
        mac: bytes | None = None,
        master: int = -1,
        alias: str | None = None,
        group: int = -1,
    ) -> None: ...
    def new_link(self, name: str, kind: str) -> None: ...
    def del_link(self, index: int = 0, name: str | None = None, *, group: int = -1) -> None: ...
    def add_tap(
        self,
        name: str,
        tun_flags: int,
        owner: int = -1,
        *,
        up: bool | None = None,
        mtu: int = 0,
        mac: bytes | None = None,
        master: int = -1,
        alias: str | None = None,
    ) -> None: ...
