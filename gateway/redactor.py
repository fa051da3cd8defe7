"""The Presidio engine: finds personal data and secrets in text, off the event loop.

Owns the only imports of Presidio and spaCy, the pool of worker processes that run them (one
analyzer each, sized to the cores, behind a bounded queue), the sharing of one request's work
between idle workers, the keyed cache of analysis results per text, the rules applied to raw
findings (thresholds, allow- and deny-lists, overlaps) and the keyed hash. Must not change
request bodies (the `RedactPrompt` stage does), download models or reach the network, or log
text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import hmac
import importlib.util
import itertools
import multiprocessing
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from gateway import metrics
from gateway.config import ConfigError, RedactionSettings
from gateway.errors import PayloadTooLargeError, ServiceUnavailableError
from gateway.log import get_logger
from gateway.redaction_rules import DENY_LIST_ENTITY, NER_ENTITIES, RedactionRules
from gateway.secret_recognizers import SECRET_DETECTOR_ENTITIES, find_matches

RawFinding = tuple[int, int, str, float]
NER_LABELS = {
    "PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION",
    "FAC": "LOCATION", "ORG": "ORGANIZATION", "NORP": "NRP", "DATE": "DATE_TIME",
}  # fmt: skip
INSTALL_HINT = (
    "pip install --no-deps --require-hashes -r requirements-model.txt (or: pip install {package})"
)
log = get_logger("gateway.redactor")


@dataclass(frozen=True, slots=True)
class Finding:
    """One span of a text to redact, after the rules were applied."""

    start: int
    end: int
    entity: str
    score: float


class Redactor:
    """Analyzes texts in worker processes; `open()` before use and `close()` after."""

    def __init__(self, settings: RedactionSettings) -> None:
        self.settings = settings
        self.rules = settings.rules
        self.workers = settings.workers or len(os.sched_getaffinity(0))
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._pending = 0
        self._cache: OrderedDict[bytes, tuple[RawFinding, ...]] = OrderedDict()
        key = settings.hash_key.get_secret_value().encode() if settings.hash_key else b""
        self._hash_key = key or secrets.token_bytes(32)
        self._cache_key = secrets.token_bytes(32)

    def update_rules(self, rules: RedactionRules) -> None:
        """Replaces the default rules (e.g. after policy files were reloaded)."""
        self.rules = rules

    async def open(self) -> None:
        """Starts the workers and waits until one has loaded the model.

        Raises `ConfigError` naming the install command when the spaCy model is missing.
        """
        check_model_installed(self.settings.spacy_model)
        self._pool = self._new_pool()
        loop = asyncio.get_running_loop()
        warmups = [loop.run_in_executor(self._pool, _warm) for _ in range(self.workers)]
        try:
            await asyncio.gather(*warmups)
        except BrokenProcessPool as exc:
            raise RuntimeError("the redaction workers failed to start; see their log") from exc
        log.info("redactor_started", model=self.settings.spacy_model, workers=self.workers)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            stop = functools.partial(pool.shutdown, wait=True, cancel_futures=True)
            await asyncio.get_running_loop().run_in_executor(None, stop)

    async def ready(self) -> str | None:
        """None when the workers are up, else a short reason (for `/readyz`)."""
        return None if self._pool is not None else "redactor workers are not running"

    def keyed_hash(self, value: str) -> str:
        """A stable, keyed digest of `value` (12 hex characters)."""
        return hmac.new(self._hash_key, value.encode(), hashlib.sha256).hexdigest()[:12]

    async def analyze(self, texts: Sequence[str], rules: RedactionRules) -> list[list[Finding]]:
        """Findings per text under `rules`: non-overlapping, sorted by position.

        Raises `PayloadTooLargeError` for a text over the limit and `ServiceUnavailableError`
        when the workers are overloaded, failing or too slow (never returns unanalyzed).
        """
        self._check_lengths(texts)
        entities = rules.detected()
        keys = [self._key(entities, text) for text in texts]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        unique = list(dict.fromkeys(texts[i] for i in missing))
        metrics.REDACTION_CACHE.labels("hit").inc(len(texts) - len(missing))
        metrics.REDACTION_CACHE.labels("miss").inc(len(missing))
        if unique:
            fresh = dict(zip(unique, await self._run(unique, entities), strict=True))
            for i in missing:
                self._remember(keys[i], fresh[texts[i]])
        return [
            apply_rules(text, self._cache.get(key) or (), rules)
            for text, key in zip(texts, keys, strict=True)
        ]

    def _check_lengths(self, texts: Sequence[str]) -> None:
        limit = self.settings.max_text_chars
        if any(len(text) > limit for text in texts):
            raise PayloadTooLargeError(
                f"A text in this request is longer than the {limit} characters the redactor "
                "accepts. Split it into smaller messages."
            )

    def _key(self, entities: tuple[str, ...], text: str) -> bytes:
        scope = ",".join(entities).encode() + b"\0"
        return hmac.new(self._cache_key, scope + text.encode(), hashlib.sha256).digest()

    def _remember(self, key: bytes, findings: tuple[RawFinding, ...]) -> None:
        self._cache[key] = findings
        self._cache.move_to_end(key)
        while len(self._cache) > self.settings.cache_size:
            self._cache.popitem(last=False)

    async def _run(
        self, texts: list[str], entities: tuple[str, ...]
    ) -> list[tuple[RawFinding, ...]]:
        if not entities:
            return [() for _ in texts]
        pool = self._pool
        if pool is None:
            raise ServiceUnavailableError("The redactor is not running. Try again later.")
        if self._pending >= self.workers + self.settings.queue_size:
            metrics.REDACTION_REJECTED.labels("overload").inc()
            raise ServiceUnavailableError(
                "The redactor is overloaded. Try again shortly.", headers={"Retry-After": "1"}
            )
        # Idle workers share one request's work (latency is the slowest share, not the sum);
        # under load each request stays one task, so splitting never costs throughput.
        idle = self.workers - self._pending
        pieces = plan_pieces(texts, entities, idle)
        tasks = spread(pieces, idle)
        futures = [self._submit(pool, [piece.job(texts) for piece in task]) for task in tasks]
        done = await self._wait(futures, pool)
        return join_pieces(texts, [p for task in tasks for p in task], [r for d in done for r in d])

    def _submit(
        self, pool: concurrent.futures.ProcessPoolExecutor, jobs: list[Job]
    ) -> concurrent.futures.Future[list[tuple[RawFinding, ...]]]:
        try:
            future = pool.submit(analyze_in_worker, jobs)
        except BrokenProcessPool as exc:
            raise self._broken(pool) from exc
        self._pending += 1
        loop = asyncio.get_running_loop()
        # The callback runs on the pool's thread; the count is only touched on the loop's.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._finished))
        return future

    def _finished(self) -> None:
        self._pending -= 1

    async def _wait(
        self,
        futures: list[concurrent.futures.Future[list[tuple[RawFinding, ...]]]],
        pool: concurrent.futures.ProcessPoolExecutor,
    ) -> list[list[tuple[RawFinding, ...]]]:
        try:
            async with asyncio.timeout(self.settings.timeout):
                return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except TimeoutError as exc:
            metrics.REDACTION_REJECTED.labels("timeout").inc()
            raise ServiceUnavailableError(
                "The redactor did not finish in time, so the request was not forwarded. "
                "Try again later."
            ) from exc
        except BrokenProcessPool as exc:
            raise self._broken(pool) from exc
        except Exception as exc:
            metrics.REDACTION_REJECTED.labels("failed").inc()
            log.error("redactor_analysis_failed", error_type=type(exc).__name__)
            raise ServiceUnavailableError("The redactor failed. Try again later.") from exc

    def _broken(self, pool: concurrent.futures.ProcessPoolExecutor) -> ServiceUnavailableError:
        """A worker died: start a fresh pool (once) for the next requests and refuse this one."""
        metrics.REDACTION_REJECTED.labels("failed").inc()
        if self._pool is pool:
            log.error("redactor_workers_broken")
            pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
        return ServiceUnavailableError("The redactor failed. Try again later.")

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(self.settings.spacy_model, self.settings.phone_regions),
        )


# --- sharing one request between workers -----------------------------------------------------

Job = tuple[str, tuple[str, ...]]
"""One analysis in a worker: a text (or a piece of one) and the entity types to look for."""
MIN_PIECE = 320
"""Characters of NER a piece must have for splitting to save more than it costs."""
OVERLAP = 64
"""Characters each NER piece also reads past its cuts, so NER sees a name at a cut whole."""
PATTERN_COST = 0.1
"""Cost of the pattern recognizers per character, relative to NER."""
_SENTENCE_END = re.compile(r"[.!?:;\n]\s+")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Piece:
    """`text[start:end]` of text `index`, keeping findings that begin in `[own, own_end)`."""

    index: int
    start: int
    end: int
    own: int
    own_end: int
    entities: tuple[str, ...]

    def job(self, texts: Sequence[str]) -> Job:
        return texts[self.index][self.start : self.end], self.entities

    @property
    def cost(self) -> float:
        ner = any(e in NER_ENTITIES for e in self.entities)
        return (self.end - self.start) * (1.0 if ner else PATTERN_COST)


def plan_pieces(texts: Sequence[str], entities: tuple[str, ...], parts: int) -> list[Piece]:
    """Whole texts for one worker; for more, patterns on whole texts and NER on pieces.

    Patterns always see the whole text (a PEM block may be longer than any overlap); NER
    pieces are cut at sentence ends or spaces and overlap, and each keeps only the findings
    that begin between its cuts, so every finding is reported once.
    """
    ner = tuple(e for e in entities if e in NER_ENTITIES)
    if parts < 2 or not ner:
        return [Piece(i, 0, len(t), 0, len(t), entities) for i, t in enumerate(texts)]
    others = tuple(e for e in entities if e not in NER_ENTITIES)
    pieces = [Piece(i, 0, len(t), 0, len(t), others) for i, t in enumerate(texts) if others]
    for i, text in enumerate(texts):
        cuts = cut_points(text, min(parts, len(text) // MIN_PIECE))
        for own, own_end in itertools.pairwise(cuts):
            start = _space_before(text, own - OVERLAP) if own else 0
            end = _space_after(text, own_end + OVERLAP) if own_end < len(text) else own_end
            pieces.append(Piece(i, start, end, own, own_end, ner))
    return pieces


def cut_points(text: str, parts: int) -> list[int]:
    """0, the starts of `parts` - 1 roughly equal pieces (at sentence ends or spaces), len."""
    cuts = [0]
    for k in range(1, max(parts, 1)):
        at = _boundary(text, len(text) * k // parts)
        if cuts[-1] < at < len(text):
            cuts.append(at)
    return [*cuts, len(text)]


def _boundary(text: str, at: int) -> int:
    for pattern in (_SENTENCE_END, _SPACE):
        ends = [m.end() for m in pattern.finditer(text, max(0, at - 120), at + 120)]
        if ends:
            return min(ends, key=lambda end: abs(end - at))
    return at


def _space_before(text: str, at: int) -> int:
    space = max(text.rfind(" ", 0, max(at, 0)), text.rfind("\n", 0, max(at, 0)))
    return space + 1 if space >= 0 else 0


def _space_after(text: str, at: int) -> int:
    found = _SPACE.search(text, min(at, len(text)))
    return found.start() if found else len(text)


def spread(pieces: list[Piece], parts: int) -> list[list[Piece]]:
    """At most `parts` tasks of about equal cost (largest pieces first, to the lightest task)."""
    tasks: list[list[Piece]] = [[] for _ in range(max(parts, 1))]
    load = [0.0] * len(tasks)
    for piece in sorted(pieces, key=lambda p: -p.cost):
        lightest = load.index(min(load))
        tasks[lightest].append(piece)
        load[lightest] += piece.cost
    return [task for task in tasks if task]


def join_pieces(
    texts: Sequence[str], pieces: Sequence[Piece], found: Sequence[tuple[RawFinding, ...]]
) -> list[tuple[RawFinding, ...]]:
    """Raw findings per text, in its coordinates, from the findings per piece."""
    joined: list[list[RawFinding]] = [[] for _ in texts]
    for piece, findings in zip(pieces, found, strict=True):
        for start, end, entity, score in findings:
            if piece.own <= start + piece.start < piece.own_end:
                joined[piece.index].append((start + piece.start, end + piece.start, entity, score))
    return [tuple(findings) for findings in joined]


def check_model_installed(model: str) -> None:
    """Raises `ConfigError` with the install command when the spaCy model package is missing."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", model) and importlib.util.find_spec(model):
        return
    package = model.replace("_", "-")
    raise ConfigError(
        "redaction.spacy_model",
        [f"the spaCy model {model!r} is not installed; models are never downloaded at run "
         f"time. Install it with: {INSTALL_HINT.format(package=package)}"],
    )  # fmt: skip


def apply_rules(text: str, raw: Iterable[RawFinding], rules: RedactionRules) -> list[Finding]:
    """Keeps findings over their threshold and not allowed, adds deny-list hits, merges overlaps."""
    allowed = {value.casefold() for value in rules.allow}
    patterns = [re.compile(p) for p in rules.allow_patterns]
    kept = []
    for start, end, entity, score in raw:
        value = text[start:end]
        if score < rules.threshold_for(entity) or rules.rule_for(entity).action == "allow":
            continue
        if value.casefold() in allowed or any(p.fullmatch(value) for p in patterns):
            continue
        kept.append(Finding(start, end, entity, score))
    kept.extend(_deny_hits(text, rules))
    return merge_overlaps(kept)


def _deny_hits(text: str, rules: RedactionRules) -> list[Finding]:
    if not rules.deny or rules.rule_for(DENY_LIST_ENTITY).action == "allow":
        return []
    words = "|".join(re.escape(word) for word in sorted(rules.deny, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE)
    return [Finding(m.start(), m.end(), DENY_LIST_ENTITY, 1.0) for m in pattern.finditer(text)]


def merge_overlaps(findings: list[Finding]) -> list[Finding]:
    """Overlapping spans become their union, typed after the longest (then highest scoring) one."""
    merged: list[Finding] = []
    for finding in sorted(findings, key=lambda f: (f.start, -f.end)):
        if merged and finding.start < merged[-1].end:
            last = merged[-1]
            lead = max(last, finding, key=lambda f: (f.end - f.start, f.score))
            merged[-1] = Finding(last.start, max(last.end, finding.end), lead.entity,
                                 max(last.score, finding.score))  # fmt: skip
        else:
            merged.append(finding)
    return merged


# --- worker process side ----------------------------------------------------------------------

_ANALYZER: Any = None


def init_worker(model: str, phone_regions: Sequence[str] = ("US",)) -> None:
    """Pool initializer: builds this process's analyzer once."""
    global _ANALYZER  # one analyzer per worker process, built when it starts
    _ANALYZER = build_analyzer(model, phone_regions)


def _warm() -> int:
    analyze_in_worker([("Warm up for Jane Doe in Paris.", NER_ENTITIES)])
    return os.getpid()


def analyze_in_worker(jobs: list[Job]) -> list[tuple[RawFinding, ...]]:
    """Runs in a worker: raw findings (start, end, entity, score) per job."""
    analyzer = _ANALYZER
    results = []
    for text, entities in jobs:
        analyzer.nlp_engine.ner_enabled = any(e in NER_ENTITIES for e in entities)
        found = analyzer.analyze(text, language="en", entities=list(entities), score_threshold=0.0)
        results.append(tuple(
            (r.start, r.end, r.entity_type, float(r.score)) for r in found
            if _plausible(r.entity_type, text[r.start : r.end])
        ))  # fmt: skip
    return results


_DATE_SHAPE = re.compile(r"\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}")


def _plausible(entity: str, value: str) -> bool:
    """Drops the small model's typical NER slips: names and places with digits, number dates."""
    if entity in ("PERSON", "LOCATION", "ORGANIZATION", "NRP"):
        return not any(c.isdigit() for c in value) and any(c.isupper() for c in value)
    if entity == "DATE_TIME":
        return any(c.isalpha() for c in value) or bool(_DATE_SHAPE.search(value))
    return True


def build_analyzer(model: str, phone_regions: Sequence[str] = ("US",)) -> Any:
    """A Presidio analyzer over `model` with only what redaction needs; never downloads."""
    from presidio_analyzer import AnalyzerEngine

    check_model_installed(model)
    engine = _nlp_engine_class()(model)
    engine.load()
    registry = _registry(phone_regions)
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])


def _nlp_engine_class() -> Any:
    from presidio_analyzer.nlp_engine import (
        NerModelConfiguration,
        NlpArtifacts,
        SpacyNlpEngine,
    )

    class FocusedSpacyEngine(SpacyNlpEngine):
        """spaCy with only NER (and what it listens to); lemmas fall back to lower case."""

        def __init__(self, model_name: str) -> None:
            ignored = ["CARDINAL", "EVENT", "LANGUAGE", "LAW", "MONEY", "ORDINAL", "PERCENT",
                       "PRODUCT", "QUANTITY", "TIME", "WORK_OF_ART"]  # fmt: skip
            config = NerModelConfiguration(
                model_to_presidio_entity_mapping=NER_LABELS, labels_to_ignore=ignored
            )
            super().__init__([{"lang_code": "en", "model_name": model_name}], config)
            self.ner_enabled = True

        def load(self) -> None:
            import spacy

            nlp = spacy.load(self.models[0]["model_name"])
            nlp.select_pipes(enable=_ner_components(nlp))
            models: Any = {"en": nlp}
            self.nlp = models

        def process_text(self, text: str, language: str) -> Any:
            models: Any = self.nlp
            nlp = models[language]
            doc = nlp(text) if self.ner_enabled else nlp.make_doc(text)
            return self._doc_to_nlp_artifact(doc, language)

        def _doc_to_nlp_artifact(self, doc: Any, language: str) -> Any:
            # One pass over the tokens (the base class makes lemmas and keywords twice).
            entities, scores = self._get_updated_entities(
                doc.ents, self._get_scores_for_entities(doc)
            )
            return NlpArtifacts(
                entities=entities, tokens=doc, tokens_indices=[t.idx for t in doc],
                lemmas=[t.lemma_ or t.lower_ for t in doc], nlp_engine=self,
                language=language, scores=scores,
            )  # fmt: skip

    return FocusedSpacyEngine


def _ner_components(nlp: Any) -> list[str]:
    """`ner` plus any shared embedding layer it listens to (e.g. `transformer` in _trf)."""
    if "ner" not in nlp.pipe_names:
        raise ConfigError("redaction.spacy_model", ["the spaCy model has no `ner` component"])
    wanted = ["ner"]
    tok2vec = nlp.config["components"]["ner"]["model"].get("tok2vec", {})
    if "Listener" in str(tok2vec.get("@architectures", "")):
        upstream = tok2vec.get("upstream", "*")
        names = [n for n in nlp.pipe_names if n in ("tok2vec", "transformer")]
        wanted += names if upstream == "*" else [upstream]
    return [name for name in nlp.pipe_names if name in wanted]


def _registry(phone_regions: Sequence[str]) -> Any:
    from presidio_analyzer import RecognizerRegistry
    from presidio_analyzer import predefined_recognizers as pr

    registry = RecognizerRegistry(supported_languages=["en"])
    recognizers = [
        pr.SpacyRecognizer(supported_entities=list(NER_ENTITIES)),
        _offline_email_recognizer(), pr.PhoneRecognizer(supported_regions=tuple(phone_regions)),
        pr.CreditCardRecognizer(),
        pr.IbanRecognizer(), pr.IpRecognizer(), pr.UsSsnRecognizer(), pr.DateRecognizer(),
        pr.UrlRecognizer(), pr.CryptoRecognizer(), pr.UsBankRecognizer(),
        pr.UsLicenseRecognizer(), pr.UsItinRecognizer(), pr.UsPassportRecognizer(),
        pr.NhsRecognizer(), pr.MedicalLicenseRecognizer(), _project_recognizer(),
    ]  # fmt: skip
    for recognizer in recognizers:
        registry.add_recognizer(recognizer)
    return registry


def _offline_email_recognizer() -> Any:
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    # The default extractor fetches the public suffix list over the network on first use;
    # this one only reads the snapshot bundled with tldextract.
    extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return bool(extract(pattern_text).fqdn)

    return OfflineEmailRecognizer()


def _project_recognizer() -> Any:
    from presidio_analyzer import EntityRecognizer, RecognizerResult

    class ProjectRecognizer(EntityRecognizer):
        """Secrets, street addresses and phone formats from `gateway.secret_recognizers`."""

        def load(self) -> None:
            return None

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[Any]:
            wanted = set(entities) & SECRET_DETECTOR_ENTITIES
            return [RecognizerResult(m.entity, m.start, m.end, m.score)
                    for m in find_matches(text, wanted)]  # fmt: skip

    return ProjectRecognizer(supported_entities=sorted(SECRET_DETECTOR_ENTITIES), name="project")
