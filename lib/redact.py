"""Secrets kept out of what is written, shown or sent: a URL shown without its credentials, the
credentials a URL carries (so that the log and alerts can blank them wherever they turn up), and
secrets replaced by *** in any text.

A URL's credentials are its userinfo (`user:password@`, or a token alone as `token@`) and the values of
its credential-like query (and fragment) parameters: `key`, `sig`, `auth`, `X-Amz-Signature`, … and
any name holding key, token, secret or password, whatever the case. A request still uses the URL as
given; everything that records, shows or sends it uses `url(...)`.
"""

from __future__ import annotations

from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

MASK = "***"
# Parameter names (lower-cased) that carry a credential, beyond those holding one of CREDENTIAL_PARTS.
CREDENTIAL_NAMES = frozenset({"pwd", "passwd", "sig", "signature", "auth", "credential", "credentials",
                              "x-amz-signature", "x-amz-credential"})
CREDENTIAL_PARTS = ("key", "token", "secret", "password")


def is_credential(name: str) -> bool:
    """True for a query parameter's name that says its value is a credential (`apikey`, `X-Amz-Signature`)."""
    name = unquote_plus(name).strip().lower()
    return name in CREDENTIAL_NAMES or any(part in name for part in CREDENTIAL_PARTS)


def _params(text: str) -> list[tuple[str, str, str]]:
    """A query (or fragment) as its `&`-separated (name, '=' or '', value), as written."""
    return [piece.partition("=") for piece in text.split("&")] if text else []


def _masked_params(text: str) -> str:
    return "&".join(name + eq + (MASK if eq and value and is_credential(name) else value)
                    for name, eq, value in _params(text))


def url(value: str) -> str:
    """The URL with its credentials replaced by *** (`https://***@host:port/path?fields=…&apikey=***`),
    everything else as it was; a URL without any is returned unchanged, one that cannot be parsed is
    shown as *** alone."""
    try:
        parts = urlsplit(value)
    except ValueError:  # a broken IPv6 host: where its credentials end cannot be told
        return MASK
    netloc = f"{MASK}@{parts.netloc.rpartition('@')[2]}" if "@" in parts.netloc else parts.netloc
    masked = parts._replace(netloc=netloc, query=_masked_params(parts.query),
                            fragment=_masked_params(parts.fragment))
    return value if masked == parts else urlunsplit(masked)


def url_secrets(value: str) -> list[str]:
    """The credentials a URL carries, each as written in it and as sent (decoded), for the redaction of
    text where they may turn up on their own (an error quoting the request, an answer echoing a key):
    the password (or the user, when it comes alone: a token), and each credential parameter's value."""
    try:
        parts = urlsplit(value)
        userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    except ValueError:
        return []
    user, colon, password = userinfo.partition(":")
    found = [(password, unquote)] if colon else [(user, unquote)]
    found += [(v, unquote_plus) for text in (parts.query, parts.fragment)
              for name, eq, v in _params(text) if eq and is_credential(name)]
    return list(dict.fromkeys(s for raw, decode in found if raw for s in (raw, decode(raw))))


def text(value: str, secrets) -> str:
    """`value` with every one of `secrets` replaced by ***, the longest first (so that a secret holding
    another is replaced whole)."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        value = value.replace(secret, MASK)
    return value
