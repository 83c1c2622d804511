"""Certificate renewal with a roll-forward file protocol.

A renewal replaces three files (key, certificate, refresh token) that must
match. All three are first written as ``*.next`` (fsynced), then renamed in a
fixed order; a crash between the renames leaves ``*.next`` files behind, and
:func:`roll_forward` finishes the job at the next start. There is never a
moment where only the old set is gone.
"""

from __future__ import annotations

import os

from nkudo.agent.disks import fsync_dir
from nkudo.agent.identity import Pki, new_key_and_csr
from nkudo.wire import messages as wm

TYPE_CHECKING = False
if TYPE_CHECKING:
    from nkudo.agent.cpclient import CpClient


def roll_forward(pki: Pki) -> bool:
    """Finish an interrupted renewal; True if anything was renamed."""
    done = False
    for path in (pki.key, pki.cert, pki.refresh):
        nxt = path + ".next"
        if os.path.exists(nxt):
            os.rename(nxt, path)
            done = True
    if done:
        fsync_dir(pki.dir)
    return done


def renew(client: CpClient, pki: Pki, common_name: str) -> wm.RenewResponse:
    """Ask the control plane for a new certificate and install it (new key each time)."""
    key_pem, csr_pem = new_key_and_csr(common_name)
    resp = client.renew(wm.RenewRequest(csr_pem=csr_pem, refresh_token=pki.read_refresh()))
    pki.write(pki.key + ".next", key_pem)
    pki.write(pki.cert + ".next", resp.client_certificate_pem.encode())
    pki.write(pki.refresh + ".next", resp.refresh_token.encode())
    if resp.ca_certificate_pem:
        pki.write(pki.ca, resp.ca_certificate_pem.encode())
    roll_forward(pki)
    client.reload(pki.cert, pki.key, pki.ca)
    return resp


Stamp = tuple[tuple[int, int, int], tuple[int, int, int]]


def cred_stamp(pki: Pki) -> Stamp | None:
    """(inode, mtime, size) of the certificate and the key; None when either is missing.

    Why this is enough to notice a renewal by another process (``nkudo-edge renew``):
    every install renames a new file into place, so the inode changes even when a
    clock step leaves the mtime equal.
    """
    try:
        c, k = os.stat(pki.cert), os.stat(pki.key)
    except OSError:
        return None
    return (c.st_ino, c.st_mtime_ns, c.st_size), (k.st_ino, k.st_mtime_ns, k.st_size)


def installing(pki: Pki) -> bool:
    """A renewal is between writing its ``.next`` files and renaming them: the pair may not match yet."""
    return any(os.path.exists(p + ".next") for p in (pki.key, pki.cert))
