"""Signing asset hrefs before they are read: `--sign none` or `--sign planetary-computer`.

Planetary Computer serves NAIP from Azure Blob Storage, readable with a SAS token that its SAS API
hands out per storage container. The `planetary-computer` package does that (and caches each
container's token until shortly before it expires); it is imported only when this signer is chosen,
so it is an optional dependency (`pip install 's2naip-pairs[planetary-computer]'`, or
`pip install planetary-computer`). Hrefs outside Azure Blob Storage come back unchanged.

A signer is created in a DoFn's setup (never pickled) and called once per group of tiles: one
signature per NAIP item per group, whatever the group's size. Signed URLs are never logged.
"""
from __future__ import annotations

from apache_beam.metrics import Metrics

SIGNERS = ("none", "planetary-computer")
_SIGNATURES = Metrics.counter("fetch_nir", "signatures")


class SigningError(OSError):
    """The signer could not sign (e.g. the SAS API failed after its retries)."""


class Signer:
    name = "abstract"

    def sign(self, href: str) -> str:
        raise NotImplementedError


class NoSigner(Signer):
    name = "none"

    def sign(self, href: str) -> str:
        return href


class PlanetaryComputerSigner(Signer):
    """`planetary_computer.sign_url`: appends the container's SAS token (cached by the package).
    The SAS endpoint is the package's (env `PC_SDK_SAS_URL` to change it; a subscription key from
    `PC_SDK_SUBSCRIPTION_KEY`, both read by the package itself)."""

    name = "planetary-computer"

    def __init__(self):
        self._pc = import_planetary_computer()

    def sign(self, href: str) -> str:
        try:
            signed = self._pc.sign_url(href)
        except Exception as e:  # requests' HTTPError, ConnectionError, a bad token answer...
            raise SigningError(f"planetary-computer could not sign the href ({type(e).__name__}: "
                               f"{str(e).split('?')[0][:200]})") from None
        _SIGNATURES.inc()
        return signed


def import_planetary_computer():
    try:
        import planetary_computer
    except ImportError:
        raise ImportError(
            "--sign planetary-computer needs the planetary-computer package: "
            "pip install 's2naip-pairs[planetary-computer]' (or pip install planetary-computer)") from None
    return planetary_computer


def check_signer(name: str) -> None:
    """Fails early (on the launcher) for an unknown signer or a missing package."""
    if name not in SIGNERS:
        raise ValueError(f"unknown --sign {name!r}; choose from {', '.join(SIGNERS)}")
    if name == "planetary-computer":
        import_planetary_computer()


def make_signer(name: str) -> Signer:
    check_signer(name)
    return PlanetaryComputerSigner() if name == "planetary-computer" else NoSigner()
