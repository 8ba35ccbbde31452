"""`cds-service call` (fire a hook request file at any CDS service and check the answer against CDS Hooks 2.0)
and `cds-service keys` (make a client key pair and print the JWKS to register with a CDS service).

Exit codes of `call`: 0 the response conforms, 1 it does not (or the service did not answer 200), 2 a usage
error (unreadable file or key, bad URL, service unreachable).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import requests
from cryptography.hazmat.primitives import serialization

from cds_service.safetext import printable
from cds_service.tools.conformance import Conformance, check_response
from cds_service.tools.signing import (
    UsageError,
    algorithm_for,
    generate_key,
    load_private_key,
    make_token,
    public_jwk,
    read_file,
)

DEFAULT_KEY_FILE = "cds-client-key.pem"


# ----- printing --------------------------------------------------------------------------------------
# Everything printed from the other service's answer goes through printable(): a hostile service must not
# move the cursor, set the terminal's title, clear the screen or fake a line of this command's output.

def _raw(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else json.dumps(value))


def _s(value: Any) -> str:
    """A value of the answer as one line of safe text."""
    return printable(_raw(value))


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def describe_action(action: Any) -> str:
    action = _dict(action)
    kind = _s(action.get("type")) or "?"
    resource = action.get("resource")
    if kind == "delete":
        target = _s(action.get("resourceId")) or (resource if isinstance(resource, str) else "")
    else:
        res = _dict(resource)
        code = _dict(res.get("code"))
        codings = [f"{_s(c.get('code'))}" for c in _list(code.get("coding")) if isinstance(c, dict) and c.get("code")]
        name = _s(res.get("resourceType")) or "resource"
        if res.get("id") and kind == "update":
            name += f"/{_s(res['id'])}"
        label = _s(code.get("text"))
        target = name + (f' "{label}"' if label else "") + (f" ({', '.join(codings)})" if codings else "")
    description = _s(action.get("description"))
    return f"{kind} {target}".rstrip() + (f": {description}" if description else "")


def _wrap(text: str, indent: str, width: int = 100) -> list[str]:
    """`text` wrapped at `width`, its own line breaks kept and every line made safe for a terminal."""
    lines = []
    for line in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(printable(line), width, initial_indent=indent,
                                   subsequent_indent=" " * (len(indent) + 2), break_long_words=False,
                                   break_on_hyphens=False) or [""])
    return lines


def format_cards(data: Any) -> str:
    """The cards (and system actions) as a clinician-readable text, tolerant of malformed input."""
    body = _dict(data)
    out: list[str] = []
    for card in _list(body.get("cards")):
        card = _dict(card)
        out.append(f"[{_s(card.get('indicator')).upper() or '?'}] {_s(card.get('summary'))}")
        source = _dict(card.get("source"))
        if source:
            url = f" <{_s(source.get('url'))}>" if source.get("url") else ""
            out.append(f"  Source: {_s(source.get('label'))}{url}")
        if card.get("detail"):
            out.append("  Detail:")
            out.extend(_wrap(_raw(card["detail"]), "    "))
        suggestions = _list(card.get("suggestions"))
        if suggestions:
            how = "choose any" if card.get("selectionBehavior") == "any" else "choose at most one"
            out.append(f"  Suggestions ({how}):")
            for number, suggestion in enumerate(suggestions, 1):
                suggestion = _dict(suggestion)
                star = " (recommended)" if suggestion.get("isRecommended") is True else ""
                out.append(f"    {number}. {_s(suggestion.get('label'))}{star}")
                for action in _list(suggestion.get("actions")):
                    out.extend(_wrap(describe_action(action), "       - "))
        reasons = [_s(_dict(r).get("display") or _dict(r).get("code")) for r in _list(card.get("overrideReasons"))]
        if reasons:
            out.extend(_wrap("Override reasons: " + "; ".join(reasons), "  "))
        for link in _list(card.get("links")):
            link = _dict(link)
            out.append(f"  Link ({_s(link.get('type'))}): {_s(link.get('label'))} <{_s(link.get('url'))}>")
        if card.get("uuid"):
            out.append(f"  uuid: {_s(card['uuid'])}")
        out.append("")
    actions = _list(body.get("systemActions"))
    if actions:
        out.append("System actions:")
        for action in actions:
            out.extend(_wrap(describe_action(action), "  - "))
        out.append("")
    return "\n".join(out)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ----- the commands ----------------------------------------------------------------------------------

def _read_request(path: str) -> bytes:
    raw = read_file(path)
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise UsageError(f"{path} must hold a JSON object (a CDS Hooks request)")
    return raw


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"URL must be an http(s) CDS service endpoint, like https://host/cds-services/<id>: {url}")


def _authorization(url: str, key_file: str | None, iss: str | None, kid: str | None,
                   alg: str | None) -> dict[str, str]:
    if not key_file:
        if iss or kid:
            raise UsageError("--iss and --kid are only used with --key")
        return {}
    if not iss:
        raise UsageError("--key needs --iss (the issuer the service knows this client by)")
    key = load_private_key(key_file)
    alg = algorithm_for(key, alg)
    kid = kid or public_jwk(key, alg)["kid"]
    return {"Authorization": "Bearer " + make_token(key, alg, iss, url, kid)}


def _usage_errors(command: Callable[..., int]) -> Callable[..., int]:
    """A UsageError becomes its message on standard error and exit code 2."""
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> int:
        try:
            return command(*args, **kwargs)
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return run


@_usage_errors
def call(url: str, file: str, *, key: str | None = None, iss: str | None = None, kid: str | None = None,
         alg: str | None = None, json_output: bool = False, timeout: float = 30.0) -> int:
    """`cds-service call`: POST the request file, print the answer, and say whether it conforms (exit code)."""
    _check_url(url)
    if alg and not key:
        raise UsageError("--alg is only used with --key")
    raw = _read_request(file)
    headers = {"Content-Type": "application/json", "Accept": "application/json",
               **_authorization(url, key, iss, kid, alg)}
    started = time.perf_counter()
    try:
        response = requests.post(url, data=raw, headers=headers, timeout=timeout, allow_redirects=False)
    except requests.Timeout:
        raise UsageError(f"no answer from {url} within {timeout:g} s") from None
    except requests.exceptions.SSLError:
        raise UsageError(f"cannot reach {url}: TLS handshake failed") from None
    except requests.RequestException as exc:
        text = str(exc).lower()
        why = ("connection refused" if "refused" in text else
               "host name not found" if "resolve" in text or "name or service" in text else type(exc).__name__)
        raise UsageError(f"cannot reach {url}: {why}") from None
    millis = (time.perf_counter() - started) * 1000
    text = response.text
    if json_output:  # the body as sent, but for characters that would act on the terminal (JSON stays JSON)
        print(printable(text.replace("\r\n", "\n"), keep="\n\t"))
    try:
        data, is_json = response.json(), True
    except ValueError:
        data, is_json = None, False
    head = f"POST {url} -> HTTP {response.status_code} in {millis:.0f} ms"
    if response.status_code != 200:
        detail = _s(_dict(data).get("message") or text[:300].strip() or response.reason)
        print(f"{head}: {detail}", file=sys.stderr if json_output else sys.stdout)
        print(f"error: the service did not answer 200 OK (HTTP {response.status_code})", file=sys.stderr)
        return 1
    result = check_response(data) if is_json else Conformance(["response: is not JSON"])
    if is_json and response.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
        result.notes.append("response: Content-Type is not application/json")
    stream = sys.stderr if json_output else sys.stdout
    if not json_output:
        body = _dict(data)
        counts = _count(len(_list(body.get("cards"))), "card")
        if _list(body.get("systemActions")):
            counts += ", " + _count(len(body["systemActions"]), "system action")
        print(f"{head}: {counts}\n")
        print(format_cards(data))
    for note in result.notes:
        print(f"note: {note}", file=stream)
    if result.ok:
        print("The response conforms to CDS Hooks 2.0.", file=stream)
        return 0
    print(f"The response does not conform to CDS Hooks 2.0 ({_count(len(result.problems), 'problem')}):",
          file=sys.stderr)
    for problem in result.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 1


@_usage_errors
def keys(alg: str = "ES384", kid: str | None = None, out: str = DEFAULT_KEY_FILE) -> int:
    """`cds-service keys`: write a new private key (PEM, owner-only) and print its public JWKS."""
    key = generate_key(alg)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{out} already exists; choose another --out (keys are never overwritten)") from None
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    jwk = public_jwk(key, alg, kid)
    print(json.dumps({"keys": [jwk]}, indent=2))
    print(f"Private key written to {out} (keep it secret). Register the JWKS above with the CDS service, "
          f"then: cds-service call URL FILE --key {out} --iss YOUR-ISSUER --kid {jwk['kid']}",
          file=sys.stderr)
    return 0
