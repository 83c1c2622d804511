"""cloud-init NoCloud seed image (ISO 9660, volume label ``cidata``) built in Python.

Built with pycdlib (a maintained ISO library) rather than shelling out to
genisoimage/cloud-localds: no external tool on the host, no shell, and the
bytes are deterministic for the same inputs.
"""

from __future__ import annotations

import io

from nkudo.agent.disks import write_atomic


def build_seed_iso(user_data: str, meta_data: str, network_config: str | None = None) -> bytes:
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    files = [("USERDATA.;1", "user-data", user_data), ("METADATA.;1", "meta-data", meta_data)]
    if network_config is not None:
        files.append(("NETWORKC.;1", "network-config", network_config))
    for iso_name, name, text in files:
        data = text.encode("utf-8")
        iso.add_fp(io.BytesIO(data), len(data), f"/{iso_name}", rr_name=name, joliet_path=f"/{name}")
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def write_seed_iso(path: str, user_data: str, meta_data: str, network_config: str | None = None) -> int:
    data = build_seed_iso(user_data, meta_data, network_config)
    write_atomic(path, data)
    return len(data)


def read_seed_iso(data: bytes) -> dict[str, str]:
    """Read back the files of a seed image by their Rock Ridge names (for tests and `inspect`)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    out: dict[str, str] = {}
    try:
        for child in iso.list_children(rr_path="/"):
            raw = child.rock_ridge.name() if child.rock_ridge else None
            name = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            if not name or name in (".", "..") or child.is_dir():
                continue
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path=f"/{name}")
            out[name] = buf.getvalue().decode("utf-8")
    finally:
        iso.close()
    return out
