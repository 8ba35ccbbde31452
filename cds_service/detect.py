"""Is this order a sacroplasty? Rules come from cards/<policy>/detection.json.

The principle: a coded order is what its standard code says. An order that carries a procedure code from a
standard system (CPT, HCPCS, ICD-10-PCS, SNOMED CT, LOINC) is a sacroplasty only when that code is a
sacroplasty code, or a vertebral augmentation code whose treated level is the sacrum. Only an order without a
standard code (none, or only a local catalogue's codes) is judged by its words: names and synonyms, matched
with some tolerance for spelling and spacing, unless the words around them say the order is something else
(imaging, a consult, a follow-up, a history).

Works on the raw JSON of a ServiceRequest (dicts and lists as the client sent them), so that imperfect FHIR
never raises: anything of the wrong shape is simply not evidence. The cost is bounded: each text is cut to
`text.max_chars` characters and at most `text.max_texts` texts are read per order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Sequence

from .policy import Policy


@dataclass(frozen=True)
class Match:
    """Why an order was judged a sacroplasty."""

    rule: str  # "code", "text" or "vertebral-augmentation-site"
    evidence: str  # short identifier from detection.json ("CPT|0200T", "text:sacroplasty-name"); never order text
    laterality: str | None = None


# --- raw JSON helpers ---------------------------------------------------------------------------------------

def _dicts(value: Any) -> list[dict[str, Any]]:
    """A FHIR list as sent: a list, or (from imperfect clients) a single object."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return []


def _codings(concept: Any) -> list[dict[str, Any]]:
    return [c for concept_ in _dicts(concept) for c in _dicts(concept_.get("coding"))]


def _texts(concept: Any) -> Iterable[str]:
    for concept_ in _dicts(concept):
        if isinstance(concept_.get("text"), str):
            yield concept_["text"]
        for coding in _dicts(concept_.get("coding")):
            if isinstance(coding.get("display"), str):
                yield coding["display"]


# --- text: normalisation and tokens ---------------------------------------------------------------------------

CACHE_SIZE = 2048  # texts (as token tuples) whose analysis is kept: catalogue texts repeat across orders
BOUNDARY = "|"  # a clause boundary (, ; : . parentheses, line break) kept as a token
_TOKEN = re.compile(r"[a-z0-9]+|[,;:.()\[\]\n]")  # linear: no nested or overlapping quantifiers
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")


def tokens(text: str, max_chars: int) -> list[str]:
    """Casefolded words of at most `max_chars` characters of text; punctuation that ends a clause becomes
    BOUNDARY, any other punctuation or space only separates ("L5/S1" -> l5 s1, "s/p" -> s p)."""
    found = _TOKEN.findall(text[:max_chars].casefold())
    return [t if t[0].isalnum() else BOUNDARY for t in found]


def compact(text: str, max_chars: int) -> str:
    """Casefolded letters and digits only: what the screen looks in ("sacro plasty" -> "sacroplasty")."""
    return _NOT_ALNUM.sub("", text[:max_chars].casefold())


def edit_distance_at_most(a: str, b: str, limit: int) -> bool:
    """Levenshtein distance of a and b <= limit, computed in a band of width 2*limit+1 (cost O(len * limit))."""
    if abs(len(a) - len(b)) > limit:
        return False
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [limit + 1] * len(b)
        lo, hi = max(1, i - limit), min(len(b), i + limit)
        for j in range(lo, hi + 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != b[j - 1]))
        if min(current) > limit:
            return False
        previous = current
    return previous[len(b)] <= limit


def pieces(word: str, edits: int) -> list[str]:
    """`word` cut into edits+1 consecutive pieces: a string within `edits` edits of `word` holds one of them
    unchanged (each edit touches at most one piece). The screen relies on this."""
    n = edits + 1
    size, extra = divmod(len(word), n)
    out, start = [], 0
    for k in range(n):
        end = start + size + (1 if k < extra else 0)
        out.append(word[start:end])
        start = end
    return out


# --- terms: the words of the rules ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    """One word of a rule as written in detection.json: "word" (exact), "word*" (prefix) or "word~" (within
    `fuzzy_edits` edits, also when the clinician split it: "sacro plasty")."""

    word: str
    kind: str  # "exact", "prefix", "fuzzy"

    @staticmethod
    def parse(spec: str) -> "Term":
        spec = spec.casefold().strip()
        if spec.endswith("*"):
            return Term(spec[:-1], "prefix")
        if spec.endswith("~"):
            return Term(spec[:-1], "fuzzy")
        return Term(spec, "exact")


@dataclass(frozen=True)
class Phrase:
    """Consecutive terms ("vertebral augmentation"); a fuzzy phrase is one fuzzy term."""

    terms: tuple[Term, ...]

    @staticmethod
    def parse(spec: str) -> "Phrase":
        return Phrase(tuple(Term.parse(w) for w in spec.split()))


def _phrases(specs: Any) -> tuple[Phrase, ...]:
    """The phrases of a detection.json list; anything not a non-empty word is left out."""
    if not isinstance(specs, list):
        return ()
    phrases = (Phrase.parse(s) for s in specs if isinstance(s, str) and s.strip())
    return tuple(p for p in phrases if all(t.word for t in p.terms))


class Matcher:
    """Finds phrases in a token list. Fuzzy terms also match 2 or 3 adjacent tokens joined.

    Each phrase list is indexed once (by its first word when exact), so a text costs one dictionary look-up
    per token plus the few prefix and fuzzy phrases; an edit distance is computed only for a candidate that
    holds one of the fuzzy word's pieces (a necessary condition, see `pieces`)."""

    def __init__(self, edits: int) -> None:
        self.edits = edits
        self._indexes: dict[int, tuple[dict[str, tuple[Phrase, ...]], tuple[Phrase, ...], tuple[Any, ...]]] = {}
        self._pieces: dict[str, tuple[tuple[str, int], ...]] = {}

    def _offsets(self, word: str) -> tuple[tuple[str, int], ...]:
        out, offset = [], 0
        for piece in pieces(word, self.edits):
            out.append((piece, offset))
            offset += len(piece)
        return tuple(out)

    def _index(self, phrases: tuple[Phrase, ...]):
        index = self._indexes.get(id(phrases))
        if index is None:
            by_first: dict[str, list[Phrase]] = {}
            others: list[Phrase] = []
            for phrase in phrases:
                first = phrase.terms[0]
                if first.kind == "exact":
                    by_first.setdefault(first.word, []).append(phrase)
                else:
                    others.append(phrase)
                for term in phrase.terms:
                    if term.kind == "fuzzy":
                        self._pieces[term.word] = self._offsets(term.word)
            index = ({k: tuple(v) for k, v in by_first.items()}, tuple(others), phrases)  # phrases: keeps id alive
            self._indexes[id(phrases)] = index
        return index

    def term_at(self, term: Term, words: Sequence[str], i: int) -> int:
        """Tokens the term covers starting at i (0 when it does not match there)."""
        word = words[i]
        if word == BOUNDARY:
            return 0
        if term.kind == "exact":
            return 1 if word == term.word else 0
        if term.kind == "prefix":
            return 1 if word.startswith(term.word) else 0
        size = len(term.word)
        lo, hi = size - self.edits, size + self.edits
        if len(word) > hi:
            return 0
        parts = self._pieces.get(term.word) or self._offsets(term.word)
        k_ = self.edits
        joined = ""
        for k in range(i, min(i + 3, len(words))):
            if words[k] == BOUNDARY:
                break
            joined += words[k]
            if len(joined) > hi:
                break
            # Necessary: one piece is intact, shifted by at most `edits` (each edit moves it by at most one).
            if len(joined) >= lo and any(joined.find(p, max(0, off - k_), off + k_ + len(p)) >= 0 for p, off in parts) \
                    and edit_distance_at_most(joined, term.word, self.edits):
                return k - i + 1
        return 0

    def phrase_at(self, phrase: Phrase, words: Sequence[str], i: int) -> int:
        j = i
        for term in phrase.terms:
            if j >= len(words):
                return 0
            n = self.term_at(term, words, j)
            if not n:
                return 0
            j += n
        return j - i

    def find(self, phrases: tuple[Phrase, ...], words: Sequence[str]) -> list[tuple[int, int]]:
        """(start, end) of every occurrence of any phrase."""
        by_first, others, _ = self._index(phrases)
        out = []
        for i, word in enumerate(words):
            for phrase in by_first.get(word, ()):
                n = self.phrase_at(phrase, words, i)
                if n:
                    out.append((i, i + n))
                    break
            else:
                for phrase in others:
                    n = self.phrase_at(phrase, words, i)
                    if n:
                        out.append((i, i + n))
                        break
        return out


# --- the sacral site --------------------------------------------------------------------------------------------

_SACRAL_LEVEL = re.compile(r"s[1-5]")
_OTHER_LEVEL = re.compile(r"(?:l[1-5]|t(?:[1-9]|1[0-2]))")


@dataclass(frozen=True)
class SiteRules:
    words: frozenset[str]
    not_a_bone_after: frozenset[str]
    not_a_bone_before: frozenset[str]
    diagnosis_after: frozenset[str]
    history_before: tuple[Phrase, ...]
    history_window: int

    @staticmethod
    def load(data: Any) -> "SiteRules":
        data = data if isinstance(data, dict) else {}

        def words(key: str) -> frozenset[str]:
            value = data.get(key, [])
            return frozenset(w.casefold() for w in value if isinstance(w, str)) if isinstance(value, list) \
                else frozenset()

        window = data.get("history_window", 4)
        return SiteRules(words("words"), words("not_a_bone_after"), words("not_a_bone_before"),
                         words("diagnosis_after"), _phrases(data.get("history_before", [])),
                         window if isinstance(window, int) and 0 < window < 20 else 4)


class Site:
    """Where an order's words place the treated level."""

    def __init__(self, rules: SiteRules, matcher: Matcher) -> None:
        self.rules = rules
        self.matcher = matcher
        # catalogue texts repeat from order to order: analyse each token tuple once (bounded cache)
        self.mentions = lru_cache(maxsize=CACHE_SIZE)(self._mentions)  # type: ignore[method-assign]

    def _mentions(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
        """Token positions of sacral mentions that name a treated level (plain), of those that name a
        diagnosis ("sacral insufficiency fracture"), and whether another vertebral level is named."""
        plain: list[int] = []
        diagnosis: list[int] = []
        other_level = False
        if not any(w in self.rules.words or _SACRAL_LEVEL.fullmatch(w) or _OTHER_LEVEL.fullmatch(w) for w in words):
            return (), (), False  # no sacral word and no other level: nothing to say
        history = self._history_ranges(words)
        for i, word in enumerate(words):
            if _OTHER_LEVEL.fullmatch(word) and not self._junction(words, i) and not history(i):
                other_level = True
                continue
            is_level = bool(_SACRAL_LEVEL.fullmatch(word))
            if not is_level and word not in self.rules.words:
                continue
            if is_level and self._junction(words, i):
                continue  # L5-S1, L5/S1, L4-L5-S1: the lumbosacral junction, not the sacrum
            after = self._next(words, i, 2)
            before = self._previous(words, i, 1)
            if after & self.rules.not_a_bone_after or before & self.rules.not_a_bone_before:
                continue  # S1 nerve root, S1 radiculopathy, sacral neuromodulation, sacral pressure ulcer
            if history(i):
                continue  # old sacral fracture, s/p sacral fracture
            (diagnosis if after & self.rules.diagnosis_after else plain).append(i)
        return tuple(plain), tuple(diagnosis), other_level

    def is_sacral(self, texts: Sequence[tuple[str, ...]]) -> bool:
        plain, diagnosis, other = False, False, False
        for words in texts:
            p, d, o = self.mentions(words)
            plain, diagnosis, other = plain or bool(p), diagnosis or bool(d), other or o
        return plain or (diagnosis and not other)

    def near(self, words: tuple[str, ...], start: int, end: int, window: int) -> bool:
        """A sacral mention (plain or diagnosis) within `window` tokens of words[start:end], same text."""
        plain, diagnosis, other = self.mentions(words)
        candidates = plain + (() if other else diagnosis)
        return any(start - window <= i < end + window for i in candidates)

    @staticmethod
    def _junction(words: Sequence[str], i: int) -> bool:
        is_sacral = bool(_SACRAL_LEVEL.fullmatch(words[i]))
        for j in (i - 1, i + 1):
            if 0 <= j < len(words):
                other = words[j]
                if is_sacral and _OTHER_LEVEL.fullmatch(other):
                    return True
                if not is_sacral and _SACRAL_LEVEL.fullmatch(other):
                    return True
        return False

    @staticmethod
    def _next(words: Sequence[str], i: int, n: int) -> set[str]:
        out = set()
        for j in range(i + 1, min(i + 1 + n, len(words))):
            if words[j] == BOUNDARY:
                break
            out.add(words[j])
        return out

    @staticmethod
    def _previous(words: Sequence[str], i: int, n: int) -> set[str]:
        out = set()
        for j in range(i - 1, max(i - 1 - n, -1), -1):
            if words[j] == BOUNDARY:
                break
            out.add(words[j])
        return out

    def _history_ranges(self, words: Sequence[str]):
        """A predicate: is position i within `history_window` tokens after a history word, same clause?"""
        starts = [end for _, end in self.matcher.find(self.rules.history_before, words)]
        window = self.rules.history_window

        def inside(i: int) -> bool:
            for end in starts:
                if end <= i < end + window and BOUNDARY not in words[end:i]:
                    return True
            return False

        return inside


# --- context that makes a mention not an order of the procedure ---------------------------------------------------

@dataclass(frozen=True)
class Context:
    before: tuple[Phrase, ...]  # negates a mention that follows it in the same text
    before_unless_next: frozenset[str]  # ... unless the next word is one of these ("prior authorization")
    anywhere: tuple[Phrase, ...]  # the order is of another kind (consult, follow-up, visit)
    imaging: tuple[Phrase, ...]  # an imaging study: negates what follows it, like `before` ...
    imaging_unless_within: int  # ... unless a guidance word follows within this many tokens ("CT-guided")
    guidance: tuple[Phrase, ...]

    @staticmethod
    def load(data: Any) -> "Context":
        data = data if isinstance(data, dict) else {}
        unless = data.get("before_unless_next", [])
        within = data.get("imaging_unless_within", 3)
        return Context(
            _phrases(data.get("before", [])),
            frozenset(w.casefold() for w in unless if isinstance(w, str)) if isinstance(unless, list)
            else frozenset(),
            _phrases(data.get("anywhere", [])),
            _phrases(data.get("imaging", [])),
            within if isinstance(within, int) and 0 <= within < 10 else 3,
            _phrases(data.get("guidance", [])),
        )


class Negation:
    def __init__(self, context: Context, matcher: Matcher) -> None:
        self.context = context
        self.matcher = matcher
        self.first_cue = lru_cache(maxsize=CACHE_SIZE)(self._first_cue)  # type: ignore[method-assign]

    def other_kind(self, texts: Sequence[Sequence[str]]) -> bool:
        """Any text says the order is a consult, a follow-up, a visit, ..."""
        return any(self.matcher.find(self.context.anywhere, words) for words in texts)

    def _first_cue(self, words: tuple[str, ...]) -> int | None:
        """Position after the first cue that makes what follows not an order of the procedure: after, s/p,
        history of, candidate for, ..., or an imaging study (CT pelvis, s/p ...; MRI sacrum to evaluate for
        ...) unless guidance follows it (CT-guided sacroplasty)."""
        cues = []
        for _, end in self.matcher.find(self.context.before, words):
            if end < len(words) and words[end] in self.context.before_unless_next:
                continue  # "prior authorization obtained"
            cues.append(end)
            break
        guidance = [start for start, _ in self.matcher.find(self.context.guidance, words)]
        for _, end in self.matcher.find(self.context.imaging, words):
            if not any(end <= g <= end + self.context.imaging_unless_within for g in guidance):
                cues.append(end)
                break
        return min(cues) if cues else None


# --- the rules ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextRule:
    id: str
    rule: str  # the Match.rule it gives: "text" or "vertebral-augmentation-site"
    words: tuple[Phrase, ...]
    sacral_within: int | None  # None: the words alone; else a sacral site within this many tokens, or bodySite


def _system_key(system: str) -> str:
    """Compare code system URIs as equal when they differ only by case, https/http, a trailing slash, or a bare
    OID written without its urn:oid: prefix."""
    s = system.strip().casefold().rstrip("/")
    if s.startswith("https://"):
        s = "http://" + s[len("https://"):]
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)+", s):
        s = "urn:oid:" + s
    return s


_UNSET = object()
_MODIFIERS = re.compile(r"([0-9A-Z]{5})((?:[\s\-:]+[0-9A-Z]{2}){1,4})")


class Detector:
    """Compiled detection rules of one policy. Build once; `match` is cheap and never raises."""

    def __init__(self, policy: Policy) -> None:
        data = policy.detection if isinstance(policy.detection, dict) else {}
        text = data.get("text") if isinstance(data.get("text"), dict) else {}
        self._max_chars = _int(text.get("max_chars"), 300, 20, 5000)
        self._max_texts = _int(text.get("max_texts"), 12, 1, 100)
        self._matcher = Matcher(_int(text.get("fuzzy_edits"), 2, 0, 3))
        self._cached_tokens = lru_cache(maxsize=CACHE_SIZE)(lambda t: tuple(tokens(t, self._max_chars)))
        self._names_in = lru_cache(maxsize=CACHE_SIZE)(self._names_in_text)
        self._passes = lru_cache(maxsize=CACHE_SIZE)(
            lambda t: any(s in compact(t, self._max_chars) for s in self._screen))

        # standard code systems: each URI / OID sent for it -> its label ("CPT")
        self._systems: dict[str, str] = {}
        for label, uris in _dict(data.get("code_systems")).items():
            if isinstance(label, str) and not label.startswith("_") and isinstance(uris, list):
                for uri in uris:
                    if isinstance(uri, str):
                        self._systems[_system_key(uri)] = label
        self._system_labels: dict[str, str] = {}  # as sent -> label, cached
        # (label, code) -> (evidence, laterality)
        self._codes: dict[tuple[str, str], tuple[str, str | None]] = {}
        for entry in _dicts(data.get("codes")):
            self._add_codes(self._codes, entry, entry.get("laterality"))
        no_system = _dict(data.get("codes_without_system"))
        fmt = no_system.get("format")
        self._no_system_format = re.compile(fmt) if isinstance(fmt, str) else None
        self._no_system_codes = {code: hit for (label, code), hit in self._codes.items()
                                 if self._no_system_format and self._no_system_format.fullmatch(code)}
        bilateral = data.get("bilateral_modifiers", [])
        self._bilateral_modifiers = {m.upper() for m in bilateral if isinstance(m, str)} \
            if isinstance(bilateral, list) else set()

        va = _dict(data.get("vertebral_augmentation"))
        self._va_codes: dict[tuple[str, str], tuple[str, str | None]] = {}
        for entry in _dicts(va.get("codes")):
            self._add_codes(self._va_codes, entry, None)
        self._site_codes = set()
        for entry in _dicts(va.get("sacral_site_codes")):
            label = self._systems.get(_system_key(entry["system"])) if isinstance(entry.get("system"), str) else None
            if label and isinstance(entry.get("code"), str):
                self._site_codes.add((label, entry["code"].strip().upper()))

        self._site = Site(SiteRules.load(data.get("sacral_site")), self._matcher)
        self._negation = Negation(Context.load(data.get("not_an_order")), self._matcher)
        self._rules = tuple(
            TextRule(r["id"], r.get("rule", "text"), _phrases(r.get("words")),
                     r["sacral_within"] if isinstance(r.get("sacral_within"), int) else None)
            for r in _dicts(text.get("rules")) if isinstance(r.get("id"), str)
            and r.get("rule", "text") in ("text", "vertebral-augmentation-site"))
        self._names = tuple(r for r in self._rules if r.sacral_within is None)
        bilat = text.get("bilateral", [])
        self._bilateral = _phrases(bilat)

        # Most orders are not sacroplasties: one with no text holding a screen string (and no bodySite code
        # of the sacrum) cannot match a text rule, so they are not run. Used only when the screen is sound
        # for every rule (see screen_is_sound); otherwise every order runs every rule.
        screen = data.get("screen", [])
        self._screen = tuple(s.casefold() for s in screen if isinstance(s, str) and s) \
            if isinstance(screen, list) else ()
        if self._screen and not self.screen_is_sound():
            self._screen = ()

    def _add_codes(self, table: dict, entry: dict[str, Any], laterality: Any) -> None:
        code = entry.get("code")
        systems = entry.get("systems")
        if not isinstance(code, str) or not isinstance(systems, list):
            return
        for label in systems:
            if isinstance(label, str):
                table[(label, code.strip().upper())] = (f"{label}|{code.strip().upper()}",
                                                       laterality if isinstance(laterality, str) else None)

    # --- the screen ---------------------------------------------------------------------------------------------

    def necessary_strings(self, phrase: Phrase) -> list[str]:
        """Strings one of which the compact text must hold for `phrase` to match."""
        term = max(phrase.terms, key=lambda t: len(t.word))
        if term.kind == "fuzzy":
            return pieces(term.word, self._matcher.edits)
        return [term.word]

    def screen_is_sound(self) -> bool:
        """Every text rule needs a screen string: a rule that needs a sacral site needs a site word (or a
        bodySite code, checked apart); a name rule needs, for each of its phrases, one of its necessary
        strings — each of which must hold a screen string."""
        def covered(s: str) -> bool:
            return any(x in s for x in self._screen)

        site_words = list(self._site.rules.words) + [f"s{n}" for n in range(1, 6)]
        site_ok = all(covered(w) for w in site_words)
        if self._va_codes and not site_ok:
            return False  # a vertebral augmentation code needs a sacral word (or a sacral bodySite code)
        for rule in self._rules:
            if rule.sacral_within is not None:
                if not site_ok:
                    return False
                continue
            for phrase in rule.words:
                if not all(covered(s) for s in self.necessary_strings(phrase)):
                    return False
        return True

    def _passes_screen(self, texts: list[str], site_texts: list[str], order: dict[str, Any]) -> bool:
        return any(self._passes(t[: self._max_chars]) for t in texts + site_texts) \
            or self._has_sacral_site_code(order)

    # --- matching -----------------------------------------------------------------------------------------------

    def _key(self, coding: dict[str, Any]) -> tuple[str | None, str, list[str]] | None:
        """(system label or None when no system, base code, modifiers); None when the coding has no code.
        A system that is not a standard one gives the label "local"."""
        code = coding.get("code")
        if not isinstance(code, str) or not code.strip():
            return None
        code = code[:40].strip().upper()
        modifiers: list[str] = []
        # "0201T-50", "0200T 50", "0200T-RT": the base code and its modifiers
        parts = _MODIFIERS.fullmatch(code) if len(code) > 5 else None
        if parts:
            code, modifiers = parts.group(1), re.findall(r"[0-9A-Z]{2}", parts.group(2))
        system = coding.get("system")
        if not isinstance(system, str) or not system.strip():
            return None, code, modifiers
        system = system[:300]
        label = self._system_labels.get(system)
        if label is None:
            label = self._systems.get(_system_key(system), "local")
            if len(self._system_labels) < 256:  # the few systems clients send; bounded against odd ones
                self._system_labels[system] = label
        return label, code, modifiers

    def match(self, order: Any) -> Match | None:
        """Judge one ServiceRequest (raw JSON). None when it is not a sacroplasty."""
        if not isinstance(order, dict):
            return None
        code = order.get("code")
        standard: list[tuple[str, str]] = []
        texts: list[str] = []
        own: list[str] = []  # the texts that are not a standard code's display: where laterality is read
        for concept in _dicts(code):
            if isinstance(concept.get("text"), str):
                texts.append(concept["text"])
                own.append(concept["text"])
            for coding in _dicts(concept.get("coding")):
                key = self._key(coding)
                if isinstance(coding.get("display"), str):
                    texts.append(coding["display"])
                    if key is None or key[0] in (None, "local"):
                        own.append(coding["display"])  # "unilateral or bilateral" in 22511's display is no side
                if key is None:
                    continue
                label, base, modifiers = key
                if label is None:  # no system: only a code whose format cannot be anything else
                    hit = self._no_system_codes.get(base)
                    if hit:
                        return Match("code", f"no-system|{base}", self._code_laterality(hit[1], modifiers))
                    continue
                if label == "local":
                    continue
                hit = self._codes.get((label, base))
                if hit:
                    return Match("code", hit[0], self._code_laterality(hit[1], modifiers))
                standard.append((label, base))
        texts = texts[: self._max_texts]
        site = order.get("bodySite")
        site_texts = list(_texts(site))[: self._max_texts] if site is not None else []

        if standard:
            # A coded order is what its standard code says: only a vertebral augmentation code can still be a
            # sacroplasty, when its treated level is the sacrum.
            va = next((self._va_codes[k][0] for k in standard if k in self._va_codes), None)
            if va is None:
                return None
            if self._screen and not self._passes_screen(texts, site_texts, order):
                return None
            words = [self._tokens(t) for t in texts]
            if self._has_sacral_site_code(order) or \
                    self._site.is_sacral(words + [self._tokens(t) for t in site_texts]) or \
                    self._names_sacroplasty(words):
                return Match("vertebral-augmentation-site", va, self._laterality(own))
            return None

        # No standard code: the words decide.
        if self._screen and not self._passes_screen(texts, site_texts, order):
            return None
        words = [self._tokens(t) for t in texts]
        if self._negation.other_kind(words):
            return None
        site_words = [self._tokens(t) for t in site_texts]
        body_site = None  # computed once, only when a rule asks
        cues: list[Any] = [_UNSET] * len(words)  # computed once per text, only when a rule finds its words
        for rule in self._rules:
            for k, w in enumerate(words):
                for start, end in self._matcher.find(rule.words, w):
                    if cues[k] is _UNSET:
                        cues[k] = self._negation.first_cue(w)
                    if cues[k] is not None and start >= cues[k]:
                        continue  # s/p sacroplasty, candidate for sacroplasty, history of ...
                    if rule.sacral_within is not None:
                        if not self._site.near(w, start, end, rule.sacral_within):
                            if body_site is None:
                                body_site = self._has_sacral_site_code(order) or self._site.is_sacral(site_words)
                            if not body_site:
                                continue
                    return Match(rule.rule, f"text:{rule.id}", self._laterality(own))
        return None

    def _tokens(self, text: str) -> tuple[str, ...]:
        return self._cached_tokens(text[: self._max_chars])  # cut first: the cache keeps short keys only

    def _names_sacroplasty(self, words: list[tuple[str, ...]]) -> bool:
        """The order's words name the procedure a sacroplasty (not after a cue such as s/p or history of)."""
        return any(self._names_in(w) for w in words)

    def _names_in_text(self, words: tuple[str, ...]) -> bool:
        for rule in self._names:
            found = self._matcher.find(rule.words, words)
            if found:
                cue = self._negation.first_cue(words)
                if any(cue is None or start < cue for start, _ in found):
                    return True
        return False

    def _has_sacral_site_code(self, order: dict[str, Any]) -> bool:
        for coding in _codings(order.get("bodySite")):
            key = self._key(coding)
            if key and key[0] and (key[0], key[1]) in self._site_codes:
                return True
        return False

    def _code_laterality(self, laterality: str | None, modifiers: list[str]) -> str | None:
        return "bilateral" if any(m in self._bilateral_modifiers for m in modifiers) else laterality

    def _laterality(self, texts: list[str]) -> str | None:
        return "bilateral" if any(self._matcher.find(self._bilateral, self._tokens(t))
                                  for t in texts[: self._max_texts]) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any, default: int, low: int, high: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high else default
