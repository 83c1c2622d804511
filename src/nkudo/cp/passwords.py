"""Password hashing for dashboard users (issue 13): argon2id, off the event loop, with a dummy for unknown users.

Why argon2id with these parameters: it is memory-hard (a GPU guesses no faster than the memory allows) and
``m=19 MiB, t=2, p=1`` is the OWASP minimum recommendation, about 20-40 ms per hash here, so a login is cheap
for a person and expensive for a guesser. The parameters are written out, not taken from the library's
defaults, so an upgrade of argon2-cffi cannot silently change them; ``needs_rehash`` upgrades a stored hash
at the next successful login when they change.

Why a thread pool of its own: hashing is CPU- and memory-bound for tens of milliseconds and would stall every
other request if run on the event loop. Its own small pool (not ``asyncio.to_thread``'s shared one) bounds how
many run at once, so a flood of logins costs at most ``MAX_CONCURRENT`` times the memory and never takes the
threads other work needs; the rate limiter and the lock-outs bound it further.

Why ``dummy_verify``: a login for an email that does not exist must take as long as one with a wrong password,
or the response time tells an attacker which emails have accounts.
"""

from __future__ import annotations

import asyncio
import secrets
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Final

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

TIME_COST: Final = 2
MEMORY_COST_KIB: Final = 19 * 1024
PARALLELISM: Final = 1
HASH_LEN: Final = 32
SALT_LEN: Final = 16
#: Hashes computed at once (each holds MEMORY_COST_KIB); more wait their turn.
MAX_CONCURRENT: Final = 4

_hasher = PasswordHasher(time_cost=TIME_COST, memory_cost=MEMORY_COST_KIB, parallelism=PARALLELISM,
                         hash_len=HASH_LEN, salt_len=SALT_LEN, type=Type.ID)
_pool = ThreadPoolExecutor(max_workers=MAX_CONCURRENT, thread_name_prefix="argon2")


def hash_now(password: str) -> str:
    """The argon2id hash (PHC string, ``$argon2id$...``) of ``password``, computed in the calling thread."""
    return _hasher.hash(password)


def verify_now(stored: str, password: str) -> bool:
    """Whether ``password`` matches ``stored``; a malformed stored hash matches nothing."""
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    """Whether ``stored`` was made with other parameters than today's (re-hash it after a good login)."""
    try:
        return _hasher.check_needs_rehash(stored)
    except InvalidHashError:
        return True


@cache
def _dummy_hash() -> str:
    return hash_now(secrets.token_urlsafe(24))


def _dummy_verify_now(password: str) -> None:
    verify_now(_dummy_hash(), password)


async def hash_password(password: str) -> str:
    """``hash_now`` in the hashing pool."""
    return await asyncio.get_running_loop().run_in_executor(_pool, hash_now, password)


async def verify_password(stored: str, password: str) -> bool:
    """``verify_now`` in the hashing pool."""
    return await asyncio.get_running_loop().run_in_executor(_pool, verify_now, stored, password)


async def dummy_verify(password: str) -> None:
    """Spend what ``verify_password`` spends, against a hash nobody knows the password of (unknown emails)."""
    await asyncio.get_running_loop().run_in_executor(_pool, _dummy_verify_now, password)
