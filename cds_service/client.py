"""`cds-service call` (fire a hook request file at any CDS service and check the answer against CDS Hooks 2.0)
and `cds-service keys` (make a client key pair and print the JWKS to register with a CDS service).

Exit codes of `call`: 0 the response conforms, 1 it does not (or the service did not answer 200), 2 a usage
error (unreadable file or key, bad URL, service unreachable).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import jwt
import requests
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ALGORITHMS = ("ES384", "RS384")  # the two CDS Hooks 2.0 recommends
TOKEN_LIFETIME = 300  # seconds, as the CDS Hooks Sandbox does
RSA_BITS = 3072
DEFAULT_KEY_FILE = "cds-client-key.pem"

INDICATORS = ("info", "warning", "critical")
SELECTION_BEHAVIORS = ("at-most-one", "any")
ACTION_TYPES = ("create", "update", "delete")
LINK_TYPES = ("absolute", "smart")
SUMMARY_LIMIT = 140  # "<140-character summary"


class UsageError(Exception):
    """Something the caller must fix before a call can be made (exit code 2)."""


# ----- keys and tokens -------------------------------------------------------------------------------

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def generate_key(alg: str) -> SigningKey:
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg == "RS384":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise UsageError(f"--alg must be one of {', '.join(ALGORITHMS)}")


def algorithm_for(key: Any, requested: str | None = None) -> str:
    """The JWS algorithm a private key signs with: ES384 for a P-384 EC key, RS384 for RSA."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP384R1):
            raise UsageError(f"ES384 needs an EC key on curve P-384; this key is on {key.curve.name}")
        alg = "ES384"
    elif isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise UsageError(f"RS384 needs an RSA key of at least 2048 bits; this one has {key.key_size}")
        alg = "RS384"
    else:
        raise UsageError("the key must be an EC P-384 (ES384) or RSA (RS384) private key")
    if requested and requested != alg:
        raise UsageError(f"--alg {requested} does not match the key, which signs with {alg}")
    return alg


def load_private_key(path: str) -> SigningKey:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UsageError(f"key {path} is password-protected; give an unencrypted PEM private key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise UsageError(f"{path} is not a PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise UsageError("the key must be an EC P-384 (ES384) or RSA (RS384) private key")
    return key


def public_jwk(key: SigningKey, alg: str, kid: str | None = None) -> dict[str, Any]:
    """The public half as a JWK, with kid (default: its RFC 7638 thumbprint), alg and use."""
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        jwk = dict(ECAlgorithm.to_jwk(public, as_dict=True))
    else:
        jwk = dict(RSAAlgorithm.to_jwk(public, as_dict=True))
    jwk.pop("key_ops", None)
    return {**jwk, "kid": kid or thumbprint(jwk), "alg": alg, "use": "sig"}


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256): a stable key id both `keys` and `call` can derive."""
    members = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def make_token(key: SigningKey, alg: str, iss: str, aud: str, kid: str, now: float | None = None) -> str:
    """A fresh CDS Hooks client JWT: aud is the exact endpoint URL, a new jti every time."""
    issued = int(now if now is not None else time.time())
    claims = {"iss": iss, "aud": aud, "exp": issued + TOKEN_LIFETIME, "iat": issued, "jti": str(uuid.uuid4())}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})


# ----- checking a response against CDS Hooks 2.0 -----------------------------------------------------

@dataclass
class Conformance:
    """What is wrong (problems: breaks a SHALL/REQUIRED rule) and what is merely unwise (notes: SHOULD)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_absolute_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return bool(parts.scheme and (parts.netloc or parts.scheme not in ("http", "https")))


class _Checker:
    def __init__(self) -> None:
        self.result = Conformance()
        self.uuids: dict[str, str] = {}

    def problem(self, path: str, message: str) -> None:
        self.result.problems.append(f"{path}: {message}")

    def note(self, path: str, message: str) -> None:
        self.result.notes.append(f"{path}: {message}")

    def no_empty(self, obj: dict[str, Any], path: str) -> None:
        """CDS Hooks 2.0 "Use of JSON": values SHALL NOT be null or empty; omit optional fields instead."""
        for key, value in obj.items():
            if value is None or value == "" or value == [] or value == {}:
                shown = "null" if value is None else json.dumps(value)
                self.problem(f"{path}.{key}", f"is {shown}; values must not be null or empty (omit optional ones)")

    def text(self, obj: dict[str, Any], key: str, path: str, required: bool) -> None:
        if key not in obj:
            if required:
                self.problem(f"{path}.{key}", "is required")
        elif obj[key] is not None and not isinstance(obj[key], str):  # null and "" are reported by no_empty
            self.problem(f"{path}.{key}", f"must be a string, not {type(obj[key]).__name__}")

    def one_of(self, obj: dict[str, Any], key: str, path: str, allowed: tuple[str, ...], required: bool) -> None:
        if key not in obj:
            if required:
                self.problem(f"{path}.{key}", f"is required (one of {', '.join(allowed)})")
        elif obj[key] not in allowed:
            self.problem(f"{path}.{key}", f"{json.dumps(obj[key])} is not one of {', '.join(allowed)}")

    def array(self, obj: dict[str, Any], key: str, path: str, each: Callable[[Any, str], None]) -> list[Any]:
        value = obj.get(key)
        if key not in obj or value is None or value == []:
            return []
        if not isinstance(value, list):
            self.problem(f"{path}.{key}", "must be an array")
            return []
        for index, item in enumerate(value):
            each(item, f"{path}.{key}[{index}]")
        return value

    def obj(self, value: Any, path: str) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.problem(path, "must be a JSON object")
            return None
        self.no_empty(value, path)
        return value

    def uuid(self, obj: dict[str, Any], path: str, what: str) -> None:
        if "uuid" not in obj:
            self.note(path, f"has no uuid, so a CDS client cannot send feedback about this {what}")
            return
        value = obj["uuid"]
        if value is None:
            return  # reported by no_empty
        if not isinstance(value, str):
            self.problem(f"{path}.uuid", "must be a string")
        elif value:
            if value in self.uuids:
                self.problem(f"{path}.uuid", f"{value!r} is not unique (also {self.uuids[value]})")
            else:
                self.uuids[value] = f"{path}.uuid"

    def coding(self, value: Any, path: str, display_required: bool) -> None:
        coding = self.obj(value, path)
        if coding is None:
            return
        self.text(coding, "code", path, required=True)
        self.text(coding, "system", path, required=True)
        self.text(coding, "display", path, required=display_required)

    def response(self, data: Any) -> Conformance:
        if not isinstance(data, dict):
            self.problem("response", "must be a JSON object with a cards array")
            return self.result
        if "cards" not in data:
            self.problem("cards", "is required (an empty array when there is nothing to say)")
        elif not isinstance(data["cards"], list):  # "cards": [] is the one empty array the spec asks for
            self.problem("cards", "must be an array")
        else:
            for index, card in enumerate(data["cards"]):
                self.card(card, f"cards[{index}]")
        actions = data.get("systemActions")
        if "systemActions" not in data:
            pass
        elif actions is None or actions == []:
            self.problem("systemActions", f"is {json.dumps(actions)}; omit it when there are no system actions")
        elif not isinstance(actions, list):
            self.problem("systemActions", "must be an array")
        else:
            for index, action in enumerate(actions):
                self.action(action, f"systemActions[{index}]", system=True)
        return self.result

    def card(self, value: Any, path: str) -> None:
        card = self.obj(value, path)
        if card is None:
            return
        self.uuid(card, path, "card")
        self.text(card, "summary", path, required=True)
        summary = card.get("summary")
        if isinstance(summary, str) and len(summary) >= SUMMARY_LIMIT:
            self.problem(f"{path}.summary", f"is {len(summary)} characters; it must be under {SUMMARY_LIMIT}")
        self.text(card, "detail", path, required=False)
        self.one_of(card, "indicator", path, INDICATORS, required=True)
        if "source" not in card:
            self.problem(f"{path}.source", "is required")
        else:
            self.source(card["source"], f"{path}.source")
        suggestions = self.array(card, "suggestions", path, self.suggestion)
        if suggestions and "selectionBehavior" not in card:
            self.problem(f"{path}.selectionBehavior", "is required when suggestions are present "
                                                      f"({' or '.join(SELECTION_BEHAVIORS)})")
        elif "selectionBehavior" in card:
            self.one_of(card, "selectionBehavior", path, SELECTION_BEHAVIORS, required=False)
        recommended = [s for s in suggestions if isinstance(s, dict) and s.get("isRecommended") is True]
        if len(recommended) > 1 and card.get("selectionBehavior") == "at-most-one":
            self.note(path, "several suggestions are recommended but at most one can be chosen")
        self.array(card, "overrideReasons", path, lambda v, p: self.coding(v, p, display_required=True))
        self.array(card, "links", path, self.link)
        if "extension" in card and not isinstance(card["extension"], dict):
            self.problem(f"{path}.extension", "must be a JSON object")

    def source(self, value: Any, path: str) -> None:
        source = self.obj(value, path)
        if source is None:
            return
        self.text(source, "label", path, required=True)
        for key in ("url", "icon"):
            if key in source and source[key] and not _is_absolute_url(source[key]):
                self.problem(f"{path}.{key}", "must be an absolute URL")
        if "topic" in source and source["topic"]:
            self.coding(source["topic"], f"{path}.topic", display_required=False)

    def suggestion(self, value: Any, path: str) -> None:
        suggestion = self.obj(value, path)
        if suggestion is None:
            return
        self.text(suggestion, "label", path, required=True)
        self.uuid(suggestion, path, "suggestion")
        if "isRecommended" in suggestion and not isinstance(suggestion["isRecommended"], bool):
            self.problem(f"{path}.isRecommended", "must be true or false")
        self.array(suggestion, "actions", path, lambda v, p: self.action(v, p, system=False))

    def action(self, value: Any, path: str, system: bool) -> None:
        action = self.obj(value, path)
        if action is None:
            return
        self.one_of(action, "type", path, ACTION_TYPES, required=True)
        if "description" not in action and system:
            # REQUIRED in the Action table, yet the spec's own systemActions example leaves it out.
            self.note(f"{path}.description", "is missing (REQUIRED for actions; give one for system actions too)")
        else:
            self.text(action, "description", path, required=True)
        kind = action.get("type")
        if kind in ("create", "update"):
            resource = action.get("resource")
            if not isinstance(resource, dict):
                self.problem(f"{path}.resource", f"must be the FHIR resource to {kind} (a JSON object)")
            elif not _is_text(resource.get("resourceType")):
                self.problem(f"{path}.resource.resourceType", "is required in a FHIR resource")
        elif kind == "delete":
            if "resourceId" in action:
                if isinstance(action["resourceId"], list):
                    self.problem(f"{path}.resourceId", "must be a single string in CDS Hooks 2.0, not an array")
                elif action["resourceId"] is not None and not isinstance(action["resourceId"], str):
                    self.problem(f"{path}.resourceId", "must be a string (a relative reference)")
            elif isinstance(action.get("resource"), str):
                self.note(path, "names the resource to delete in 'resource', which is deprecated; use resourceId")
            else:
                self.note(path, "a delete action SHOULD name its resource in resourceId")

    def link(self, value: Any, path: str) -> None:
        link = self.obj(value, path)
        if link is None:
            return
        self.text(link, "label", path, required=True)
        if "url" not in link:
            self.problem(f"{path}.url", "is required")
        elif link["url"] and not _is_absolute_url(link["url"]):
            self.problem(f"{path}.url", "must be an absolute URL")
        self.one_of(link, "type", path, LINK_TYPES, required=True)
        if "appContext" in link:
            if link.get("type") != "smart":
                self.problem(f"{path}.appContext", "is only valid on links of type smart")
            self.text(link, "appContext", path, required=False)
        if "autolaunchable" in link and not isinstance(link["autolaunchable"], bool):
            self.problem(f"{path}.autolaunchable", "must be true or false")


def check_response(data: Any) -> Conformance:
    """Check a CDS service response body against the CDS Hooks 2.0 rules for cards and system actions."""
    return _Checker().response(data)


# ----- printing --------------------------------------------------------------------------------------

def _s(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else json.dumps(value))


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
    lines = []
    for line in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(line, width, initial_indent=indent, subsequent_indent=" " * (len(indent) + 2),
                                   break_long_words=False, break_on_hyphens=False) or [""])
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
            out.extend(_wrap(_s(card["detail"]), "    "))
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
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
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


def _authorization(args: argparse.Namespace) -> dict[str, str]:
    if not args.key:
        if args.iss or args.kid:
            raise UsageError("--iss and --kid are only used with --key")
        return {}
    if not args.iss:
        raise UsageError("--key needs --iss (the issuer the service knows this client by)")
    key = load_private_key(args.key)
    alg = algorithm_for(key, args.alg)
    kid = args.kid or public_jwk(key, alg)["kid"]
    return {"Authorization": "Bearer " + make_token(key, alg, args.iss, args.url, kid)}


def call(args: argparse.Namespace) -> int:
    """POST the request file, print the answer, and say whether it conforms."""
    _check_url(args.url)
    if args.alg and not args.key:
        raise UsageError("--alg is only used with --key")
    raw = _read_request(args.file)
    headers = {"Content-Type": "application/json", "Accept": "application/json", **_authorization(args)}
    started = time.perf_counter()
    try:
        response = requests.post(args.url, data=raw, headers=headers, timeout=args.timeout, allow_redirects=False)
    except requests.Timeout:
        raise UsageError(f"no answer from {args.url} within {args.timeout:g} s") from None
    except requests.exceptions.SSLError:
        raise UsageError(f"cannot reach {args.url}: TLS handshake failed") from None
    except requests.RequestException as exc:
        text = str(exc).lower()
        why = ("connection refused" if "refused" in text else
               "host name not found" if "resolve" in text or "name or service" in text else type(exc).__name__)
        raise UsageError(f"cannot reach {args.url}: {why}") from None
    millis = (time.perf_counter() - started) * 1000
    text = response.text
    if args.json:
        print(text)
    try:
        data, is_json = response.json(), True
    except ValueError:
        data, is_json = None, False
    head = f"POST {args.url} -> HTTP {response.status_code} in {millis:.0f} ms"
    if response.status_code != 200:
        detail = _dict(data).get("message") or text[:300].strip() or response.reason
        print(f"{head}: {detail}", file=sys.stderr if args.json else sys.stdout)
        print(f"error: the service did not answer 200 OK (HTTP {response.status_code})", file=sys.stderr)
        return 1
    result = check_response(data) if is_json else Conformance(["response: is not JSON"])
    if is_json and response.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
        result.notes.append("response: Content-Type is not application/json")
    stream = sys.stderr if args.json else sys.stdout
    if not args.json:
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


def keys(args: argparse.Namespace) -> int:
    """Write a new private key (PEM, owner-only) and print its public JWKS."""
    key = generate_key(args.alg)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{args.out} already exists; choose another --out (keys are never overwritten)") from None
    except OSError as exc:
        raise UsageError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    jwk = public_jwk(key, args.alg, args.kid)
    print(json.dumps({"keys": [jwk]}, indent=2))
    print(f"Private key written to {args.out} (keep it secret). Register the JWKS above with the CDS service, "
          f"then: cds-service call URL FILE --key {args.out} --iss YOUR-ISSUER --kid {jwk['kid']}",
          file=sys.stderr)
    return 0


def _run(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return run


def configure_call_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = ("POST a CDS Hooks request file to a CDS service endpoint, print the cards and the "
                          "latency, and check the response against CDS Hooks 2.0 (exit 1 when it does not conform).")
    parser.add_argument("url", metavar="URL", help="the service endpoint, e.g. https://host/cds-services/<id>")
    parser.add_argument("file", metavar="FILE", help="a JSON hook request file (e.g. one of fixtures/)")
    parser.add_argument("--key", metavar="PEM", help="sign a fresh JWT with this private key (EC P-384 or RSA)")
    parser.add_argument("--iss", help="the JWT issuer (the client id the service has registered); needs --key")
    parser.add_argument("--kid", help="the key id in the JWT header (default: the key's RFC 7638 thumbprint)")
    parser.add_argument("--alg", choices=ALGORITHMS, help="check the key signs with this algorithm")
    parser.add_argument("--json", action="store_true", help="print the raw response body instead of the cards")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer (default 30)")
    parser.set_defaults(func=_run(call))


def configure_keys_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Make a key pair for signing CDS Hooks calls: writes the private key (PEM) and prints "
                          "the public JWKS to register with the CDS service.")
    parser.add_argument("--alg", choices=ALGORITHMS, default="ES384", help="ES384 (default) or RS384")
    parser.add_argument("--kid", help="key id (default: the key's RFC 7638 thumbprint)")
    parser.add_argument("--out", metavar="PEM", default=DEFAULT_KEY_FILE,
                        help=f"where to write the private key (default {DEFAULT_KEY_FILE}; never overwritten)")
    parser.set_defaults(func=_run(keys))
