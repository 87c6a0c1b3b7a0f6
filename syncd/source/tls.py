"""TLS settings of a sync's requests: a verified default, a private CA, mutual TLS, or (warned) none."""

from __future__ import annotations

import functools
import os
import ssl


def ssl_context(verify: bool, ca_file: str | None, client_cert: str | None, client_key: str | None) -> ssl.SSLContext | bool | None:
    """What aiohttp's `ssl=` takes for these settings: None (the default, verified), False (no
    verification) or a context. Raises ValueError naming the file that cannot be used. Contexts
    are reused until one of the files changes (a renewed certificate is picked up at the next poll)."""
    return _context(verify, ca_file, client_cert, client_key, _stamp(ca_file), _stamp(client_cert), _stamp(client_key))


def _stamp(path: str | None) -> tuple[int, int] | None:
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size) if st else None


def _no_passphrase() -> bytes:
    # An encrypted key would make OpenSSL prompt on the terminal (and hang under systemd).
    raise ValueError("the key is encrypted; syncd needs an unencrypted key file (protect it with file permissions)")


@functools.lru_cache(maxsize=256)
def _context(verify: bool, ca_file: str | None, client_cert: str | None, client_key: str | None, *_stamps) -> ssl.SSLContext | bool | None:
    if not verify:
        return False
    if ca_file is None and client_cert is None:
        return None
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use ca_file {ca_file}: {_reason(exc)}") from None
    if client_cert is not None:
        try:
            context.load_cert_chain(client_cert, client_key, password=_no_passphrase)
        except (OSError, ssl.SSLError, ValueError) as exc:
            files = client_cert + (f" / {client_key}" if client_key else "")
            raise ValueError(f"cannot use client_cert {files}: {_reason(exc)} "
                             "(PEM certificate, and its unencrypted key in client_key or in the same file)") from None
    return context


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
