"""URIs as admflow shows, checks and forwards them.

Credentials inside a URI (``scheme://user:password@host``) are never written anywhere: every
message, MLflow param or tag, ``meta.json`` and Prefect parameter goes through
:func:`mask_uri` / :func:`mask_text` / :func:`mask_values`. A tracking server's credentials
move out of its URI into MLflow's own variables (``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``) of this process, which local Ray workers inherit; the bare URI
is the one passed around.

:func:`check_uri_form` decides which storage URIs are accepted: local paths, ``file://``,
``s3://`` and other fsspec protocols whose package is installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import urllib.parse
from typing import Any

MASK = "***"
# scheme://userinfo@ : the userinfo runs to the last '@' before the path (passwords may hold '@')
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s?#]*)@")
_SCHEME_ONLY = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):(?!//)")
_USER_VAR, _PASSWORD_VAR = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
_exported: dict[str, str] = {}  # the credential variables this process set, and their values
_exported_for: list[str] = []  # the bare URI they belong to


class UriError(ValueError):
    """A URI in a form admflow does not accept; the message names it and the accepted forms."""


def has_userinfo(uri: str) -> bool:
    return bool(_USERINFO.match(uri.strip()))


def _masked(m: re.Match) -> str:
    # user:password -> user:***; a user alone may be a token (https://TOKEN@host) -> ***
    user, sep, _password = m["userinfo"].partition(":")
    return f"{m['scheme']}{user}:{MASK}@" if sep else f"{m['scheme']}{MASK}@"


def mask_uri(uri: str) -> str:
    """``uri`` with its password (or a user without one, which may be a token) as ``***``."""
    return _USERINFO.sub(_masked, uri)


def mask_text(text: str) -> str:
    """Every URI inside ``text`` masked (a message, an override, a command line)."""
    return _USERINFO.sub(_masked, text)


def mask_values(obj: Any) -> Any:
    """A copy of plain data (dicts, lists, strings) with every URI in it masked."""
    if isinstance(obj, str):
        return mask_text(obj)
    if isinstance(obj, dict):
        return {k: mask_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(mask_values(v) for v in obj)
    return obj


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """``(bare uri, user, password)``; user and password percent-decoded."""
    m = _USERINFO.match(uri)
    if not m:
        return uri, None, None
    user, _, password = m["userinfo"].partition(":")
    bare = m["scheme"] + uri[m.end() :]
    return (
        bare,
        urllib.parse.unquote(user) or None,
        urllib.parse.unquote(password) if password else None,
    )


def tracking_uri_without_credentials(uri: str) -> str:
    """The tracking URI to pass around: an http(s) URI's credentials move into MLflow's
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` of this process (MLflow sends
    them as basic auth; local Ray workers inherit them). Credentials this process exported for
    an earlier URI are withdrawn when the next URI has none, so they never reach another
    server."""
    bare, user, password = split_userinfo(uri)
    if MASK in (user, password):  # masked earlier in this process: its credentials moved already
        return bare
    if user is None and password is None:
        if uri not in _exported_for:  # not the bare form of the URI they came with
            _withdraw()
        return uri
    _withdraw()
    for var, value in ((_USER_VAR, user), (_PASSWORD_VAR, password)):
        if value is not None:
            os.environ[var] = value
            _exported[var] = value
    _exported_for[:] = [bare]
    return bare


def _withdraw() -> None:
    for var, value in list(_exported.items()):
        if os.environ.get(var) == value:
            os.environ.pop(var, None)
        _exported.pop(var, None)
    _exported_for.clear()


def shown_tracking_uri(uri: str) -> str:
    """A bare http(s) tracking URI as the user gave it, credentials masked: ``user:***@``
    when this process holds MLflow credentials for it."""
    user, password = os.environ.get(_USER_VAR), os.environ.get(_PASSWORD_VAR)
    if has_userinfo(uri) or not uri.startswith(("http://", "https://")) or not (user or password):
        return mask_uri(uri)
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{user or ''}:{MASK}@{rest}" if password else f"{scheme}://{MASK}@{rest}"


def prefect_ui_without_credentials() -> None:
    """Prefect prints "View at <UI URL>" for every flow run, and derives that URL from
    PREFECT_API_URL, userinfo included: point it at the bare one (the API calls still carry
    the userinfo, as basic auth). Call before Prefect is imported: it reads its settings once."""
    api = os.environ.get("PREFECT_API_URL", "")
    if has_userinfo(api) and not os.environ.get("PREFECT_UI_URL"):
        bare = split_userinfo(api)[0].rstrip("/")
        os.environ["PREFECT_UI_URL"] = bare.removesuffix("/api")


def basic_auth_header() -> dict[str, str]:
    """The Authorization header MLflow itself would send, for the reachability probe."""
    import base64

    user, password = os.environ.get(_USER_VAR), os.environ.get(_PASSWORD_VAR)
    if not user and not password:
        return {}
    token = base64.b64encode(f"{user or ''}:{password or ''}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# ----------------------------------------------------------------------------- storage forms

_ALIASES = {"s3a": "s3", "s3n": "s3"}  # Hadoop's names for S3: they skip our bucket checks


def accepted_forms() -> str:
    return (
        "accepted: a local path, file:// or s3://bucket/prefix; other fsspec protocols once "
        "their package is installed (gs:// needs gcsfs, az:// adlfs)"
    )


def _fsspec_protocols() -> dict[str, dict]:
    from fsspec.registry import known_implementations

    return known_implementations


def _installed(protocol: str) -> bool:
    spec = _fsspec_protocols().get(protocol)
    if spec is None:
        return False
    module = spec["class"].split(".", 1)[0]
    return importlib.util.find_spec(module) is not None


def check_uri_form(uri: str, what: str = "storage URI") -> str:
    """``uri`` unchanged when admflow can use it, else :class:`UriError` naming it, what is
    wrong and the accepted forms (no network, no imports of the protocol's package)."""
    shown = mask_uri(uri)
    if has_userinfo(uri):
        raise UriError(
            f"{what} {shown}: credentials inside a storage URI are not accepted; remove them "
            "and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or ~/.aws/credentials)"
        )
    if "://" not in uri:
        m = _SCHEME_ONLY.match(uri)
        if m and (m["scheme"].lower() in _fsspec_protocols() or uri.startswith(f"{m[1]}:/")):
            raise UriError(
                f"{what} {shown} looks like a URL without '//' (did you mean "
                f"{m['scheme'].lower()}://{uri[len(m[0]) :].lstrip('/')}?); {accepted_forms()}"
            )
        return uri
    scheme = uri.split("://", 1)[0]
    if scheme in ("s3", "file"):
        if scheme == "s3" and not uri[5:].split("/", 1)[0]:
            raise UriError(f"{what} {shown} names no bucket; {accepted_forms()}")
        return uri
    if scheme.lower() != scheme and scheme.lower() in ("s3", "file", *_fsspec_protocols()):
        raise UriError(
            f"{what} {shown}: URL schemes are lower case here (did you mean "
            f"{scheme.lower()}://...?); {accepted_forms()}"
        )
    if scheme in _ALIASES:
        raise UriError(
            f"{what} {shown}: write {_ALIASES[scheme]}://{uri.split('://', 1)[1]} "
            f"({scheme}:// is Hadoop's name for it); {accepted_forms()}"
        )
    spec = _fsspec_protocols().get(scheme)
    if spec is None:
        raise UriError(f"{what} {shown}: unknown protocol {scheme}://; {accepted_forms()}")
    if not _installed(scheme):
        package = spec["class"].split(".", 1)[0]
        raise UriError(
            f"{what} {shown}: {scheme}:// needs the {package} package (pip install {package}); "
            f"{accepted_forms()}"
        )
    return uri


def scrub_overrides(overrides: list[str]) -> list[str]:
    """``--set`` overrides safe to record (Prefect parameters, MLflow tags): a tracking URI's
    credentials move into this process's MLflow variables, every URI is masked. A masked
    tracking URI loads as the bare one (see :func:`tracking_uri_without_credentials`)."""
    out = []
    for text in overrides:
        key, sep, value = text.partition("=")
        value = value.strip().strip("'\"")
        if sep and key.strip() == "tracking.tracking_uri" and has_userinfo(value):
            tracking_uri_without_credentials(value)
        out.append(mask_text(text))
    return out
