"""Is this order a sacroplasty? Rules come from cards/<policy>/detection.json.

The principle: a coded order is what its standard code says. An order that carries a procedure code from a
standard system (CPT, HCPCS, ICD-10-PCS, SNOMED CT, LOINC) is a sacroplasty only when that code is a
sacroplasty code, or a vertebral augmentation code whose treated level is the sacrum. Only an order without a
standard code (none, only a local catalogue's codes, only codes that name no procedure — unlisted-procedure and
image-guidance codes — or codes whose format is not valid in the system they are sent under) is judged by its
words: names and synonyms, matched with some tolerance for spelling and spacing, unless the words around them say
the mention is not an order of the procedure. Those words count only where they govern the mention: a history or
intent cue before it in the same clause (a temporal cue such as "after" only when nothing but modifiers stands
between: "after failed conservative care, sacroplasty" is an order), an imaging study before it, an order kind
(consult, follow-up) that names what the order is, not a step that accompanies the procedure.

Works on the raw JSON of a ServiceRequest (dicts and lists as the client sent them), so that imperfect FHIR
never raises: anything of the wrong shape is simply not evidence. The cost is bounded: each text is cut to
`text.max_chars` characters and at most `text.max_texts` texts are read per order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cds_service.pipeline.policy import Policy


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


_LEVEL = re.compile(r"(?:[slt][1-9]|t1[0-2]|[0-9]+)")  # S1, L5, T12, or a number (a date or a count)


_BEFORE_HEAD, _AFTER_HEAD, _CLOSED = 0, 1, 2  # where a next cue's phrase is


def governed(words: Sequence[str], clause_ends: Iterable[int], next_ends: Iterable[int], modifiers: frozenset[str],
             window: int | None = None, after_head: frozenset[str] = frozenset()) -> tuple[bool, ...]:
    """Which tokens a cue governs, in one left-to-right pass (linear).

    A clause cue (history of, s/p) governs every later token of its clause — or, with `window`, the first
    `window` of them. A next cue (after, prior, post) governs only the noun phrase right after it: `modifiers`,
    then its head (the first other word), then what may follow a head (`after_head`: laterality; and any level
    or number): "after left sacroplasty", "prior sacroplasty S1"; "after failed conservative care" governs
    "failed" only; "post-traumatic sacral fracture" governs "traumatic" only. A clause boundary ends both, except
    one right after the cue ("Hx: ...") and one inside a next cue's phrase before its head ("prior (2023) ...")."""
    clause_at, next_at = set(clause_ends), set(next_ends)
    out: list[bool] = []
    clause_count: int | None = None  # tokens governed so far by the open clause cue; None: none open
    phrase = _CLOSED
    clause_fresh = next_fresh = False  # fresh: only boundaries since the cue ended
    for i, word in enumerate(words):
        if i in clause_at:
            clause_count, clause_fresh = 0, True
        if i in next_at:
            phrase, next_fresh = _BEFORE_HEAD, True
        if word == BOUNDARY:
            out.append(False)
            if not clause_fresh:
                clause_count = None
            if not next_fresh and phrase != _BEFORE_HEAD:
                phrase = _CLOSED  # a phrase with no head yet goes on: "prior (2023) sacroplasty"
            continue
        clause_fresh = next_fresh = False
        level = bool(_LEVEL.fullmatch(word))
        if phrase == _AFTER_HEAD and word not in after_head and not level:
            phrase = _CLOSED
        in_clause = clause_count is not None and (window is None or clause_count < window)
        out.append(in_clause or phrase != _CLOSED)
        if clause_count is not None:
            clause_count += 1
        if phrase == _BEFORE_HEAD and word not in modifiers and not level:
            phrase = _AFTER_HEAD  # this word was the head: what may follow a head is still governed
    return tuple(out)


# --- terms: the words of the rules ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    """One word of a rule as written in detection.json: "word" (exact), "word*" (prefix) or "word~" (within
    `fuzzy_edits` edits, also when the clinician split it: "sacro plasty")."""

    word: str
    kind: str  # "exact", "prefix", "fuzzy"

    @staticmethod
    def parse(spec: str) -> Term:
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
    def parse(spec: str) -> Phrase:
        return Phrase(tuple(Term.parse(w) for w in spec.split()))


def _phrases(specs: Any) -> tuple[Phrase, ...]:
    """The phrases of a detection.json list; anything not a non-empty word is left out."""
    if not isinstance(specs, list):
        return ()
    phrases = (Phrase.parse(s) for s in specs if isinstance(s, str) and s.strip())
    return tuple(p for p in phrases if all(t.word for t in p.terms))


# a phrase list indexed for `Matcher.find`: by exact first word, the others, and the list itself (keeps its id alive)
_PhraseIndex = tuple[dict[str, tuple[Phrase, ...]], tuple[Phrase, ...], tuple[Phrase, ...]]


class Matcher:
    """Finds phrases in a token list. Fuzzy terms also match 2 or 3 adjacent tokens joined.

    Each phrase list is indexed once (by its first word when exact), so a text costs one dictionary look-up
    per token plus the few prefix and fuzzy phrases; an edit distance is computed only for a candidate that
    holds one of the fuzzy word's pieces (a necessary condition, see `pieces`)."""

    def __init__(self, edits: int) -> None:
        self.edits = edits
        self._indexes: dict[int, _PhraseIndex] = {}
        self._pieces: dict[str, tuple[tuple[str, int], ...]] = {}

    def _offsets(self, word: str) -> tuple[tuple[str, int], ...]:
        out, offset = [], 0
        for piece in pieces(word, self.edits):
            out.append((piece, offset))
            offset += len(piece)
        return tuple(out)

    def _index(self, phrases: tuple[Phrase, ...]) -> _PhraseIndex:
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
        if word == term.word:
            return 1  # the word as written: no edit distance to compute
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
    history_before: tuple[Phrase, ...]  # clause cues (hx, s/p): the next `history_window` words of the clause
    history_window: int
    history_next: tuple[Phrase, ...] = ()  # next cues (old, prior, post): only the phrase they govern
    landmark_before: tuple[Phrase, ...] = ()  # "adjacent to", "near": the sacrum as a landmark, not the site
    modifiers: frozenset[str] = frozenset()  # words a next cue governs through (not_an_order.modifiers)
    after_head: frozenset[str] = frozenset()  # ... and that may follow its head (not_an_order.modifiers_after_head)

    @staticmethod
    def load(data: Any, modifiers: frozenset[str] = frozenset(), after_head: frozenset[str] = frozenset()) \
            -> SiteRules:
        data = data if isinstance(data, dict) else {}

        def words(key: str) -> frozenset[str]:
            value = data.get(key, [])
            return frozenset(w.casefold() for w in value if isinstance(w, str)) if isinstance(value, list) \
                else frozenset()

        window = data.get("history_window", 4)
        return SiteRules(words("words"), words("not_a_bone_after"), words("not_a_bone_before"),
                         words("diagnosis_after"), _phrases(data.get("history_before", [])),
                         window if isinstance(window, int) and not isinstance(window, bool) and 0 < window < 20
                         else 4,
                         _phrases(data.get("history_next", [])), _phrases(data.get("landmark_before", [])),
                         modifiers, after_head)


class Site:
    """Where an order's words place the treated level."""

    def __init__(self, rules: SiteRules, matcher: Matcher) -> None:
        self.rules = rules
        self.matcher = matcher
        # catalogue texts repeat from order to order: analyse each token tuple once (bounded cache)
        self.mentions = lru_cache(maxsize=CACHE_SIZE)(self._mentions)

    def _mentions(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
        """Token positions of sacral mentions that name a treated level (plain), of those that name a
        diagnosis ("sacral insufficiency fracture"), and whether another vertebral level is named."""
        plain: list[int] = []
        diagnosis: list[int] = []
        other_level = False
        if not any(w in self.rules.words or _SACRAL_LEVEL.fullmatch(w) or _OTHER_LEVEL.fullmatch(w) for w in words):
            return (), (), False  # no sacral word and no other level: nothing to say
        history = self._history_ranges(words)
        landmark_ends = {end for _, end in self.matcher.find(self.rules.landmark_before, words)}
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
            if i in landmark_ends or (i - 1 in landmark_ends and words[i - 1] == "the"):
                continue  # iliac bone adjacent to (the) sacrum: a landmark, not the treated bone
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

    def _history_ranges(self, words: Sequence[str]) -> Callable[[int], bool]:
        """A predicate: is position i governed by a history cue (see `governed`)?"""
        flags = governed(words, (end for _, end in self.matcher.find(self.rules.history_before, words)),
                         (end for _, end in self.matcher.find(self.rules.history_next, words)),
                         self.rules.modifiers, self.rules.history_window, self.rules.after_head)
        return flags.__getitem__


# --- context that makes a mention not an order of the procedure ---------------------------------------------------

@dataclass(frozen=True)
class Context:
    history: tuple[Phrase, ...]  # clause cues: govern the rest of their clause (history of, s/p, candidate for)
    temporal: tuple[Phrase, ...]  # next cues: govern only the phrase right after them (after, prior, post)
    modifiers: frozenset[str]  # words a next cue governs through (left, bilateral, CT-guided, the ...)
    after_head: frozenset[str]  # words that may follow the head a next cue governs (left, bilateral)
    kinds: tuple[Phrase, ...]  # order kinds (consult, follow-up): name what the order is
    accompanying: tuple[Phrase, ...]  # ... unless one of these stands between the name and the kind word
    imaging: tuple[Phrase, ...]  # an imaging study before the name: negates it ...
    imaging_unless_within: int  # ... unless a guidance word follows within this many tokens ("CT-guided")
    guidance: tuple[Phrase, ...]

    @staticmethod
    def load(data: Any) -> Context:
        data = data if isinstance(data, dict) else {}
        within = data.get("imaging_unless_within", 3)
        return Context(
            _phrases(data.get("history", [])),
            _phrases(data.get("temporal", [])),
            _words(data.get("modifiers")),
            _words(data.get("modifiers_after_head")),
            _phrases(data.get("order_kinds", [])),
            _phrases(data.get("accompanying", [])),
            _phrases(data.get("imaging", [])),
            within if isinstance(within, int) and not isinstance(within, bool) and 0 <= within < 10 else 3,
            _phrases(data.get("guidance", [])),
        )


@dataclass(frozen=True)
class Cues:
    """Where the context words of one text are (token positions)."""

    governed: tuple[bool, ...]  # by a history or temporal cue
    imaging: int | None  # end of the first imaging study word (not followed by guidance); None: none
    kinds: tuple[int, ...]  # starts of order-kind words
    accompanying: tuple[int, ...]  # starts of accompanying words


class Negation:
    """Is a mention of the procedure in a text an order of it? (not_an_order in detection.json)"""

    def __init__(self, context: Context, matcher: Matcher) -> None:
        self.context = context
        self.matcher = matcher
        self.cues = lru_cache(maxsize=CACHE_SIZE)(self._cues)

    def _cues(self, words: tuple[str, ...]) -> Cues:
        find = self.matcher.find
        context = self.context
        flags = governed(words, (end for _, end in find(context.history, words)),
                         (end for _, end in find(context.temporal, words)), context.modifiers,
                         after_head=context.after_head)
        guidance = [start for start, _ in find(context.guidance, words)]
        imaging = next((end for _, end in find(context.imaging, words)
                        if not any(end <= g <= end + context.imaging_unless_within for g in guidance)), None)
        return Cues(flags, imaging, tuple(start for start, _ in find(context.kinds, words)),
                    tuple(start for start, _ in find(context.accompanying, words)))

    def negated(self, words: tuple[str, ...], start: int, end: int, kinds: bool = True) -> bool:
        """The mention words[start:end] is not an order of the procedure: a history or temporal cue governs it,
        an imaging study comes before it, or (when `kinds`) an order kind names what the order is — before the
        mention, or after it with no accompanying word between ("Sacroplasty follow-up visit" is a visit;
        "Sacroplasty under CT, same day follow up" is the procedure)."""
        cues = self.cues(words)
        if cues.governed[start] or (cues.imaging is not None and cues.imaging <= start):
            return True
        return kinds and self.kind_names_order(words, start, end)

    def kind_names_order(self, words: tuple[str, ...], start: int, end: int) -> bool:
        """An order-kind word names what the order is, relative to the mention words[start:end]."""
        cues = self.cues(words)
        first_accompanying = min((a for a in cues.accompanying if a >= end), default=len(words))
        return any(kind < start or end <= kind < first_accompanying for kind in cues.kinds)

    def names_a_kind(self, words: tuple[str, ...]) -> bool:
        """The text names an order kind (for a text that does not name the procedure: display "IR CONSULT")."""
        return bool(self.cues(words).kinds)


# --- the rules ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextRule:
    id: str
    rule: str  # the Match.rule it gives: "text" or "vertebral-augmentation-site"
    words: tuple[Phrase, ...]
    sacral_within: int | None  # None: the words alone; else a sacral site within this many tokens, or bodySite
    hardware_within: int | None = None  # a hardware word this near, same clause: a screw / fixation augmentation
    other_bone: bool = False  # another bone named right before ("iliac cementoplasty") or after ("of the ilium")


def _system_key(system: str) -> str:
    """Compare code system URIs as equal when they differ only by case, https/http, a trailing slash, or a bare
    OID written without its urn:oid: prefix."""
    s = system.strip().casefold().rstrip("/")
    if s.startswith("https://"):
        s = "http://" + s[len("https://"):]
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)+", s):
        s = "urn:oid:" + s
    return s


_MODIFIERS = re.compile(r"([0-9A-Z]{5})((?:[\s\-:]+[0-9A-Z]{2}){1,4})")


# (code system label, code) -> (evidence, laterality)
_CodeTable = dict[tuple[str, str], tuple[str, str | None]]


class Detector:
    """Compiled detection rules of one policy. Build once; `match` is cheap and never raises."""

    def __init__(self, policy: Policy) -> None:
        data = policy.detection if isinstance(policy.detection, dict) else {}
        text = _dict(data.get("text"))
        self._max_chars = _int(text.get("max_chars"), 300, 20, 5000)
        self._max_texts = _int(text.get("max_texts"), 12, 1, 100)
        self._matcher = Matcher(_int(text.get("fuzzy_edits"), 2, 0, 3))
        self._cached_tokens = lru_cache(maxsize=CACHE_SIZE)(lambda t: tuple(tokens(t, self._max_chars)))
        self._names_in = lru_cache(maxsize=CACHE_SIZE)(self._names_in_text)
        self._first_mention = lru_cache(maxsize=CACHE_SIZE)(self._first_mention_in)
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
        self._other_codes: dict[tuple[str, str], bool] = {}  # (system, code) as sent -> _other_procedure
        # (label, code) -> (evidence, laterality)
        self._codes: _CodeTable = {}
        for entry in _dicts(data.get("codes")):
            self._add_codes(self._codes, entry, entry.get("laterality"))
        no_system = _dict(data.get("codes_without_system"))
        fmt = no_system.get("format")
        self._no_system_format = re.compile(fmt) if isinstance(fmt, str) else None
        self._no_system_codes = {code: hit for (label, code), hit in self._codes.items()
                                 if self._no_system_format and self._no_system_format.fullmatch(code)}
        # a code whose format is not valid in its system is read as a code without a system
        self._formats: dict[str, re.Pattern[str]] = {}
        for label, fmt in _dict(data.get("code_formats")).items():
            if isinstance(label, str) and not label.startswith("_") and isinstance(fmt, str):
                try:
                    self._formats[label] = re.compile(fmt)
                except re.error:
                    continue  # a broken format checks nothing (every code is read as valid)
        # unlisted-procedure and image-guidance codes: they name no procedure, so the words decide
        self._naming_no_procedure: _CodeTable = {}
        for entry in _dicts(_dict(data.get("codes_naming_no_procedure")).get("codes")):
            self._add_codes(self._naming_no_procedure, entry, None)
        bilateral = data.get("bilateral_modifiers", [])
        self._bilateral_modifiers = {m.upper() for m in bilateral if isinstance(m, str)} \
            if isinstance(bilateral, list) else set()

        va = _dict(data.get("vertebral_augmentation"))
        self._va_codes: _CodeTable = {}
        for entry in _dicts(va.get("codes")):
            self._add_codes(self._va_codes, entry, None)
        self._site_codes = set()
        for entry in _dicts(va.get("sacral_site_codes")):
            site_label = self._systems.get(_system_key(entry["system"])) if isinstance(entry.get("system"), str) \
                else None
            if site_label and isinstance(entry.get("code"), str):
                self._site_codes.add((site_label, entry["code"].strip().upper()))

        context = Context.load(data.get("not_an_order"))
        self._site = Site(SiteRules.load(data.get("sacral_site"), context.modifiers, context.after_head),
                          self._matcher)
        self._negation = Negation(context, self._matcher)
        self._rules = tuple(
            TextRule(r["id"], r.get("rule", "text"), _phrases(r.get("words")),
                     _opt_int(r.get("sacral_within"), 0, 50), _opt_int(r.get("hardware_within"), 0, 50),
                     r.get("other_bone") is True)
            for r in _dicts(text.get("rules")) if isinstance(r.get("id"), str)
            and r.get("rule", "text") in ("text", "vertebral-augmentation-site"))
        self._hardware = _words(text.get("hardware"))
        self._other_bones = _words(text.get("other_bones"))
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

    def _add_codes(self, table: _CodeTable, entry: dict[str, Any], laterality: object) -> None:
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

    def _other_procedure(self, coding: dict[str, Any]) -> bool:
        """Is this coding a standard code of some other procedure, neither one of ours nor a vertebral
        augmentation code? An order coded only so is no sacroplasty, whatever its texts say (see `match`).
        Remembered per (system, code) as sent, like the texts' analyses: the same catalogue codes come in call
        after call (most orders of an order-sign call are such orders)."""
        system, code = coding.get("system"), coding.get("code")
        if not isinstance(system, str) or not isinstance(code, str):
            return False
        memo_key = (system, code)
        verdict = self._other_codes.get(memo_key)
        if verdict is None:
            key = self._key(coding)
            verdict = key is not None and key[0] not in (None, "local") \
                and (self._formats.get(key[0]) is None or bool(self._formats[key[0]].fullmatch(key[1]))) \
                and (key[0], key[1]) not in self._naming_no_procedure \
                and (key[0], key[1]) not in self._codes and (key[0], key[1]) not in self._va_codes
            if len(code) <= 64 and len(system) <= 300:
                if len(self._other_codes) >= CACHE_SIZE:
                    self._other_codes.clear()
                self._other_codes[memo_key] = verdict
        return verdict

    def _only_other_procedures(self, codings: list[Any]) -> bool:
        for coding in codings:
            if not isinstance(coding, dict) or not self._other_procedure(coding):
                return False
        return True

    def match(self, order: Any) -> Match | None:
        """Judge one ServiceRequest (raw JSON). None when it is not a sacroplasty."""
        if not isinstance(order, dict):
            return None
        code = order.get("code")
        if isinstance(code, dict):
            codings = code.get("coding")
            # Only standard codes of other procedures: what the loop below concludes, without reading texts.
            if isinstance(codings, list) and codings and self._only_other_procedures(codings):
                return None
        standard: list[tuple[str, str]] = []
        texts: list[str] = []
        own: list[str] = []  # the texts that are not a standard code's display: where laterality is read
        for concept in _dicts(code):
            if isinstance(concept.get("text"), str):
                texts.append(concept["text"])
                own.append(concept["text"])
            for coding in _dicts(concept.get("coding")):
                key = self._key(coding)
                if key is not None and key[0] not in (None, "local"):
                    fmt = self._formats.get(key[0])
                    if fmt is not None and not fmt.fullmatch(key[1]):
                        key = (None, key[1], key[2])  # "0200T" under LOINC is no LOINC code: read as no system
                    elif (key[0], key[1]) in self._naming_no_procedure:
                        key = ("local", key[1], key[2])  # unlisted / guidance code: names no procedure
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
        rule = self._first_rule(words, site_texts, order)
        if rule is None:
            return None
        # Any text may say what kind of order this is: a text that does not name the procedure by any order-kind
        # word (display "IR CONSULT"), one that does by an order-kind word that governs its first mention.
        for w in words:
            if self._negation.names_a_kind(w):
                mention = self._first_mention(w)
                if mention is None or self._negation.kind_names_order(w, mention[0], mention[1]):
                    return None
        return Match(rule.rule, f"text:{rule.id}", self._laterality(own))

    def _first_rule(self, words: list[tuple[str, ...]], site_texts: list[str], order: dict[str, Any]) \
            -> TextRule | None:
        """The first text rule with a mention that is an order of the procedure."""
        body_site = None  # computed once, only when a rule asks
        for rule in self._rules:
            for w in words:
                for start, end in self._matcher.find(rule.words, w):
                    if self._negation.negated(w, start, end):
                        continue  # s/p sacroplasty, candidate for sacroplasty, sacroplasty follow-up visit ...
                    if rule.hardware_within is not None and self._near_hardware(w, start, end, rule.hardware_within):
                        continue  # cement-augmented iliosacral screw fixation: the screw is augmented
                    if rule.other_bone and self._names_other_bone(w, start, end):
                        continue  # iliac cementoplasty, cementoplasty of the acetabulum: another bone is treated
                    if rule.sacral_within is not None and not self._site.near(w, start, end, rule.sacral_within):
                        if body_site is None:
                            body_site = self._has_sacral_site_code(order) or \
                                self._site.is_sacral([self._tokens(t) for t in site_texts])
                        if not body_site:
                            continue
                    return rule
        return None

    def _first_mention_in(self, words: tuple[str, ...]) -> tuple[int, int] | None:
        """(start, end) of the earliest mention of any rule's words in the text, negated or not."""
        found = [hit for rule in self._rules for hit in self._matcher.find(rule.words, words)[:1]]
        return min(found) if found else None

    def _near_hardware(self, words: tuple[str, ...], start: int, end: int, window: int) -> bool:
        """A hardware word (screw, fixation, fusion) within `window` tokens of words[start:end], same clause."""
        for j in range(start - 1, max(start - 1 - window, -1), -1):
            if words[j] == BOUNDARY:
                break
            if words[j] in self._hardware:
                return True
        for j in range(end, min(end + window, len(words))):
            if words[j] == BOUNDARY:
                break
            if words[j] in self._hardware:
                return True
        return False

    def _names_other_bone(self, words: tuple[str, ...], start: int, end: int) -> bool:
        """Another bone named as what words[start:end] treats: right before it ("iliac cementoplasty"), or after
        it through "of" / "of the" ("cementoplasty of the ilium")."""
        if start > 0 and words[start - 1] in self._other_bones:
            return True
        j = end
        if j < len(words) and words[j] == "of":
            j += 1
            if j < len(words) and words[j] == "the":
                j += 1
            return j < len(words) and words[j] in self._other_bones
        return False

    def _tokens(self, text: str) -> tuple[str, ...]:
        return self._cached_tokens(text[: self._max_chars])  # cut first: the cache keeps short keys only

    def _names_sacroplasty(self, words: list[tuple[str, ...]]) -> bool:
        """The order's words name the procedure a sacroplasty (not after a cue such as s/p or history of)."""
        return any(self._names_in(w) for w in words)

    def _names_in_text(self, words: tuple[str, ...]) -> bool:
        """A name of the procedure that no history cue or earlier imaging study governs (the code already says
        what kind of order this is, so order-kind words are not read)."""
        for rule in self._names:
            for start, end in self._matcher.find(rule.words, words):
                if not self._negation.negated(words, start, end, kinds=False):
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


def _opt_int(value: Any, low: int, high: int) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high else None


def _words(value: Any) -> frozenset[str]:
    """A detection.json list of single words, casefolded; anything else is left out."""
    return frozenset(w.casefold() for w in value if isinstance(w, str)) if isinstance(value, list) else frozenset()
