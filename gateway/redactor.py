"""The redaction engine: finds personal data and secrets in text, off the event loop.

Owns the pool of worker processes that run Presidio (one analyzer each, sized to the cores,
behind a bounded queue; the worker side is `gateway.redaction_worker`), the sharing of one
request's work between idle workers (planned by `gateway.redaction_split`), the one exception
to "off the event loop" (pattern-only work on at most `in_process_chars` characters, cheaper
here than the round trip, by the workers' own analysis code), the keyed cache of
analysis results per text, the rules applied to raw findings (thresholds, allow- and
deny-lists, overlaps) and the keyed hash. Must not import Presidio or spaCy, change request
bodies (the `RedactPrompt` stage does), download models or reach the network, or log text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import hmac
import multiprocessing
import os
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from gateway import metrics
from gateway.config import RedactionSettings
from gateway.errors import PayloadTooLargeError, ServiceUnavailableError
from gateway.log import get_logger
from gateway.redaction_rules import DENY_LIST_ENTITY, NER_ENTITIES, RedactionRules
from gateway.redaction_split import Job, RawFinding, join_pieces, plan_pieces, spread
from gateway.redaction_worker import (
    analyze_in_worker,
    analyze_jobs,
    build_analyzer,
    check_model_installed,
    init_worker,
    warm,
)

log = get_logger("gateway.redactor")


@dataclass(frozen=True, slots=True)
class Finding:
    """One span of a text to redact, after the rules were applied."""

    start: int
    end: int
    entity: str
    score: float


@dataclass(frozen=True, slots=True)
class _Cached:
    """A text's raw findings, and the findings the last rules used on it made of them."""

    raw: tuple[RawFinding, ...]
    rules: RedactionRules | None = None
    findings: tuple[Finding, ...] = ()


class Redactor:
    """Analyzes texts in worker processes; `open()` before use and `close()` after."""

    def __init__(self, settings: RedactionSettings) -> None:
        self.settings = settings
        self.rules = settings.rules
        self.workers = settings.workers or len(os.sched_getaffinity(0))
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._pending = 0
        self._local: Any = None  # this process's own analyzer, for short pattern-only work
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self._hits = metrics.incrementer(metrics.REDACTION_CACHE, "hit")
        self._misses = metrics.incrementer(metrics.REDACTION_CACHE, "miss")
        key = settings.hash_key.get_secret_value().encode() if settings.hash_key else b""
        self._hash_key = key or secrets.token_bytes(32)
        self._cache_key = secrets.token_bytes(32)
        self._key_entities: tuple[str, ...] | None = None
        self._key_prefix = b""

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
        warmups = [loop.run_in_executor(self._pool, warm) for _ in range(self.workers)]
        try:
            await asyncio.gather(*warmups)
        except BrokenProcessPool as exc:
            raise RuntimeError("the redaction workers failed to start; see their log") from exc
        if self.settings.in_process_chars and not _needs_ner(self.rules.detected()):
            build = functools.partial(
                build_analyzer, self.settings.spacy_model, self.settings.phone_regions
            )
            local = await loop.run_in_executor(None, build)
            warm_up = [("Warm up: jane@example.com, +1 202 555 0143.", self.rules.detected())]
            await loop.run_in_executor(None, analyze_jobs, local, warm_up)
            self._local = local
        log.info("redactor_started", model=self.settings.spacy_model, workers=self.workers,
                 in_process=self._local is not None)  # fmt: skip

    async def close(self) -> None:
        self._local = None
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

    async def analyze(
        self, texts: Sequence[str], rules: RedactionRules
    ) -> list[tuple[Finding, ...]]:
        """Findings per text under `rules`: non-overlapping, sorted by position.

        Raises `PayloadTooLargeError` for a text over the limit and `ServiceUnavailableError`
        when the workers are overloaded, failing or too slow (never returns unanalyzed).
        """
        self._check_lengths(texts)
        entities = rules.detected()
        keys = self._keys(entities, texts)
        cached = list(map(self._cache.get, keys))
        misses = cached.count(None)
        if misses:
            self._misses(misses)
        if misses < len(texts):
            self._hits(len(texts) - misses)
        fresh = await self._analyzed(texts, keys, cached, entities) if misses else {}
        found = []
        for key, entry, text in zip(keys, cached, texts, strict=True):
            done = fresh[text] if entry is None else entry
            # The usual repeat, a text seen before under these same rules, takes no work.
            found.append(
                done.findings if done.rules is rules else self._applied(key, done, text, rules)
            )
        return found

    def _check_lengths(self, texts: Sequence[str]) -> None:
        limit = self.settings.max_text_chars
        if texts and max(map(len, texts)) > limit:
            raise PayloadTooLargeError(
                f"A text in this request is longer than the {limit} characters the redactor "
                "accepts. Split it into smaller messages."
            )

    def _keys(self, entities: tuple[str, ...], texts: Sequence[str]) -> list[bytes]:
        """Cache keys: SHA-256 of a per-process secret, the entity types looked for and the
        text. The secret keeps prompts from being confirmed from the cache's keys; the keys
        never leave the process, so one pass (no HMAC) is enough, at a third of its cost."""
        prefix = self._prefix(entities)
        return [hashlib.sha256(prefix + text.encode()).digest() for text in texts]

    def _prefix(self, entities: tuple[str, ...]) -> bytes:
        """The secret and a digest of `entities`, made again only when other rules are used
        (each rules object keeps its tuple): joining and hashing some thirty names per request
        cost more than hashing the text."""
        if entities is not self._key_entities:
            names = hashlib.sha256(",".join(entities).encode()).digest()
            self._key_prefix, self._key_entities = self._cache_key + names, entities
        return self._key_prefix

    async def _analyzed(
        self,
        texts: Sequence[str],
        keys: list[bytes],
        cached: list[_Cached | None],
        entities: tuple[str, ...],
    ) -> dict[str, _Cached]:
        """Analyzes the texts the cache did not have and remembers them under their keys."""
        missing = {text: key for text, key, entry in zip(texts, keys, cached, strict=True)
                   if entry is None}  # fmt: skip
        unique = list(missing)
        found = await self._run(unique, entities)
        return {
            text: self._remember(missing[text], raw)
            for text, raw in zip(unique, found, strict=True)
        }

    def _remember(self, key: bytes, raw: tuple[RawFinding, ...]) -> _Cached:
        entry = self._cache[key] = _Cached(raw)
        self._cache.move_to_end(key)
        while len(self._cache) > self.settings.cache_size:
            self._cache.popitem(last=False)
        return entry

    def _applied(
        self, key: bytes, entry: _Cached, text: str, rules: RedactionRules
    ) -> tuple[Finding, ...]:
        """`apply_rules` on a fresh analysis or one cached under other rules, remembered until
        other rules are used on it."""
        entry = _Cached(entry.raw, rules, tuple(apply_rules(text, entry.raw, rules)))
        if key in self._cache:
            self._cache[key] = entry
        return entry.findings

    async def _run(
        self, texts: list[str], entities: tuple[str, ...]
    ) -> list[tuple[RawFinding, ...]]:
        if not entities:
            return [() for _ in texts]
        if self._fits_in_process(texts, entities):
            return self._analyze_here(texts, entities)
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

    def _fits_in_process(self, texts: list[str], entities: tuple[str, ...]) -> bool:
        """Pattern-only work (no NER) on short texts costs less CPU here than the round trip
        to a worker; the size cap bounds how long it holds up the event loop."""
        if self._local is None or _needs_ner(entities):
            return False
        return sum(map(len, texts)) <= self.settings.in_process_chars

    def _analyze_here(
        self, texts: list[str], entities: tuple[str, ...]
    ) -> list[tuple[RawFinding, ...]]:
        """The workers' own analysis (`analyze_jobs`, same recognizers), in this process."""
        try:
            return analyze_jobs(self._local, [(text, entities) for text in texts])
        except Exception as exc:  # Presidio's own errors: any analysis failure refuses
            raise _failed(exc) from exc

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
        except Exception as exc:  # an analysis that raised in its worker
            raise _failed(exc) from exc

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


def _failed(exc: Exception) -> ServiceUnavailableError:
    """An analysis that raised: counted, logged by type only (never text), refused with 503."""
    metrics.REDACTION_REJECTED.labels("failed").inc()
    log.error("redactor_analysis_failed", error_type=type(exc).__name__)
    return ServiceUnavailableError("The redactor failed. Try again later.")


def _needs_ner(entities: Iterable[str]) -> bool:
    return any(entity in NER_ENTITIES for entity in entities)


def apply_rules(text: str, raw: Iterable[RawFinding], rules: RedactionRules) -> list[Finding]:
    """Keeps findings over their threshold and not allowed, adds deny-list hits, merges overlaps."""
    allowed, patterns = rules.allowed_values, rules.allow_regexes
    kept = []
    for start, end, entity, score in raw:
        if score < rules.threshold_for(entity) or rules.rule_for(entity).action == "allow":
            continue
        value = text[start:end]
        if allowed and value.casefold() in allowed:
            continue
        if any(p.fullmatch(value) for p in patterns):
            continue
        kept.append(Finding(start, end, entity, score))
    if rules.deny_regex is not None:
        kept += [Finding(m.start(), m.end(), DENY_LIST_ENTITY, 1.0)
                 for m in rules.deny_regex.finditer(text)]  # fmt: skip
    return merge_overlaps(kept)


def merge_overlaps(findings: list[Finding]) -> list[Finding]:
    """Overlapping spans become their union, typed after the longest (then highest scoring) one."""
    if len(findings) < 2:
        return findings
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
