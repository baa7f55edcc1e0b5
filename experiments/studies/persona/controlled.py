"""The controlled Persona design (docs/math.md §6.2.1): does a reward model generalize to *new answer words*?

The paper's evaluation pairs ("My response would be certainly", "I lean toward nope") change the answer word and
the opening together, and on a small model the opening alone decides the outcome. The controlled design separates
them. Every pair keeps one opening o on both sides and changes only the answer word:

    same-opening pair   (o + yes-word, o + no-word)

for every opening o, every yes-word and every no-word of one word list. The cells are

    {seen opening (the training openings), new opening} × {seen words (the training words), new word list k}
    × {training prompts, test prompts}

and a cell's accuracy is the mean over its pairs and prompts. Every opening appears with both polarities, so an
opening that carries a polarity of its own cancels out of the pair. The opening effect is measured on its own as
well: the same word after a training yes-opening and a training no-opening,

    opening pair        (p_yes + w, p_no + w)   for every training yes-opening p_yes, no-opening p_no, word w,

whose accuracy is 1 when the opening alone decides the preference and ½ when it carries nothing.

New words must never appear in training, as tokens too: `check_tokens` refuses a new word whose answer-span tokens
meet the training words' (e.g. "no way" carries the training word's token " no"). The answer span of o + w is the
tokens after the longest prefix it shares with o + w' for the design's other words: the tests check that a pair's
two sequences differ only there.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dynamics.errors import ConfigError, DataError

__all__ = [
    "CONTROLLED_KEYS",
    "ControlledDesign",
    "WordList",
    "answer_span",
    "check_tokens",
    "controlled_design",
    "controlled_prompts",
    "controlled_sets",
    "controlled_suite",
    "pair_accuracies",
    "training_words",
    "wins",
]

#: The plan keys of the design (experiments/plans/persona.toml).
CONTROLLED_KEYS = ("design", "new_openings", "new_words_yes", "new_words_no", "controlled_train_prompts")


@dataclasses.dataclass(frozen=True)
class WordList:
    """One list of answer words: `name` ("seen", "new1", …), its yes-words and no-words."""

    name: str
    yes: tuple[str, ...]
    no: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ControlledDesign:
    """The openings and word lists of the controlled design (module docstring).

    Attributes:
      openings_yes, openings_no: the training openings of each polarity (equally many).
      new_openings: openings never used in training.
      words: the seen word list (the training words) first, then the new lists.
      n_train_prompts: how many training prompts the cells use (the first ones); every test prompt is used.
    """

    openings_yes: tuple[str, ...]
    openings_no: tuple[str, ...]
    new_openings: tuple[str, ...]
    words: tuple[WordList, ...]
    n_train_prompts: int

    @property
    def seen_openings(self) -> tuple[str, ...]:
        return self.openings_yes + self.openings_no

    def openings(self, kind: str) -> tuple[str, ...]:
        """The openings of kind "seen" or "new"."""
        return self.seen_openings if kind == "seen" else self.new_openings

    @property
    def all_words(self) -> tuple[str, ...]:
        return tuple(w for lst in self.words for w in lst.yes + lst.no)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _strings(values: Mapping[str, Any], key: str) -> list[str]:
    items = values[key]
    if not isinstance(items, list) or not items or any(not isinstance(s, str) or not s.strip() for s in items):
        raise ConfigError(f"{key} must be a non-empty list of non-empty strings, got {items!r}")
    return list(items)


def training_words(values: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The answer words training draws from: words_yes / words_no plus the first `augment_k` words of
    augment_words_yes / augment_words_no (the paraphrase-augmentation remedy, docs/math.md §6.2.3).

    Raises:
      ConfigError: augment_k < 0 or larger than a pool, or a pool word that is already a training word.
    """
    k = values["augment_k"]
    yes, no = _strings(values, "words_yes"), _strings(values, "words_no")
    pools = {side: values[f"augment_words_{side}"] for side in ("yes", "no")}
    if not isinstance(k, int) or k < 0 or any(k > len(p) for p in pools.values()):
        sizes = {side: len(p) for side, p in pools.items()}
        raise ConfigError(f"augment_k must be in 0…{min(sizes.values())} (the augment_words pools {sizes}), got {k!r}")
    extra_yes, extra_no = list(pools["yes"][:k]), list(pools["no"][:k])
    for w in extra_yes + extra_no:
        if w in yes + no:
            raise ConfigError(f"augment_words: {w!r} is already a training word")
    return yes + extra_yes, no + extra_no


def _word_lists(values: Mapping[str, Any]) -> list[WordList]:
    yes, no = values["new_words_yes"], values["new_words_no"]
    if not isinstance(yes, list) or not isinstance(no, list) or not yes or len(yes) != len(no):
        raise ConfigError(
            f"new_words_yes and new_words_no must be equally long non-empty lists of word lists (list k of each is "
            f"new word list k), got {len(yes) if isinstance(yes, list) else yes!r} and "
            f"{len(no) if isinstance(no, list) else no!r} lists"
        )
    out = []
    for k, (y, n) in enumerate(zip(yes, no, strict=True)):
        for key, words in ((f"new_words_yes[{k}]", y), (f"new_words_no[{k}]", n)):
            _strings({key: words}, key)
        out.append(WordList(f"new{k + 1}", tuple(y), tuple(n)))
    return out


def _check_disjoint(lists: Sequence[WordList]) -> None:
    """No word twice: within a list, across its polarities, or across lists (the seen list included)."""
    where: dict[str, str] = {}
    for lst in lists:
        for side, words in (("yes", lst.yes), ("no", lst.no)):
            for w in words:
                key = w.strip().lower()
                here = f"the {lst.name} {side}-words" if lst.name != "seen" else f"the training {side}-words"
                if key in where:
                    raise ConfigError(
                        f"the answer word {w!r} is in {where[key]} and in {here}: word lists must be disjoint"
                    )
                where[key] = here


def controlled_design(values: Mapping[str, Any], n_train: int) -> ControlledDesign:
    """The design of a plan's keys, checked (pure Python, before any model loads).

    Raises:
      ConfigError: an empty word or opening list; word lists that overlap (within or across lists, the training
        words and their augment_k augmentation words included); a new opening that is a training opening or
        contains an answer word; training openings unequally many per polarity (the seen-opening cells would
        then lean to one polarity's openings);
        controlled_train_prompts outside 1…n_train.
    """
    openings_yes, openings_no = _strings(values, "prefixes_yes"), _strings(values, "prefixes_no")
    if len(openings_yes) != len(openings_no):
        raise ConfigError(
            f"the controlled design needs as many training yes-openings as no-openings, so that the seen-opening "
            f"cells weigh both polarities alike: prefixes_yes has {len(openings_yes)}, prefixes_no "
            f"{len(openings_no)}"
        )
    new_openings = _strings(values, "new_openings")
    yes, no = training_words(values)
    seen = WordList("seen", tuple(yes), tuple(no))
    lists = [seen, *_word_lists(values)]
    _check_disjoint(lists)
    all_openings = openings_yes + openings_no
    for o in new_openings:
        if o in all_openings or o.strip() in [p.strip() for p in all_openings]:
            raise ConfigError(f"new_openings: {o!r} is a training opening; new openings must be new")
        words = set(o.lower().replace(",", " ").replace(":", " ").split())
        hit = [w for lst in lists for w in lst.yes + lst.no if set(w.lower().split()) <= words]
        if hit:
            raise ConfigError(f"new_openings: {o!r} contains the answer word {hit[0]!r}; an opening must not answer")
    if len(set(new_openings)) != len(new_openings):
        raise ConfigError(f"new_openings lists an opening twice: {new_openings!r}")
    n = values["controlled_train_prompts"]
    if not isinstance(n, int) or not 1 <= n <= n_train:
        raise ConfigError(f"controlled_train_prompts must be in 1…n_train = {n_train}, got {n!r}")
    return ControlledDesign(tuple(openings_yes), tuple(openings_no), tuple(new_openings), tuple(lists), n)


def answer_span(tokenizer: Any, opening: str, word: str, other: str) -> tuple[list[int], list[int]]:
    """(tokens of opening + word, the index range [start, end) of its answer span), the span being the tokens after
    the longest common prefix with opening + other (a different word)."""
    a, b = tokenizer.encode(opening + word), tokenizer.encode(opening + other)
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return a, [k, len(a)]


def check_tokens(design: ControlledDesign, tokenizer: Any) -> dict[str, list[int]]:
    """Each word's answer-span token ids (after every opening), and a check that no new word shares a token with
    the training words.

    Raises:
      DataError: a new word whose answer-span tokens meet the training words' (naming the word and the tokens).
    """
    spans: dict[str, set[int]] = {}
    words = design.all_words
    for w in words:
        other = next(x for x in words if x != w)
        for o in design.seen_openings + design.new_openings:
            ids, (s, e) = answer_span(tokenizer, o, w, other)
            spans.setdefault(w, set()).update(ids[s:e])
    seen = design.words[0]
    trained = set().union(*(spans[w] for w in seen.yes + seen.no))
    for lst in design.words[1:]:
        for w in lst.yes + lst.no:
            shared = spans[w] & trained
            if shared:
                text = ", ".join(repr(tokenizer.decode([t])) for t in sorted(shared))
                raise DataError(
                    f"the new word {w!r} ({lst.name}) shares the token(s) {text} with the training words "
                    f"{list(seen.yes + seen.no)}: a new word must be new as tokens too"
                )
    return {w: sorted(s) for w, s in spans.items()}


def _set_name(split: str, opening: str, word: str) -> str:
    return f"{split}/controlled/{opening}|{word}"


def controlled_sets(
    encode: Callable[[Sequence[str], Sequence[str]], Any],
    prompts: Mapping[str, Sequence[str]],
    design: ControlledDesign,
) -> dict[str, Any]:
    """The sequence sets of the design: for each split and each (opening, word) of the design, the prompts with
    response opening + word, as `encode` returns them ({set name: encoded})."""
    out = {}
    for split, rows in prompts.items():
        for o in design.seen_openings + design.new_openings:
            for w in design.all_words:
                out[_set_name(split, o, w)] = encode(list(rows), [o + w] * len(rows))
    return out


def controlled_prompts(texts: Any, design: ControlledDesign) -> dict[str, list[str]]:
    """{"train": the first `n_train_prompts` training prompts, "test": every test prompt} of `PersonaTexts`."""
    return {
        "train": [r["prompt"] for r in texts.train[: design.n_train_prompts]],
        "test": [r["prompt"] for r in texts.test],
    }


def _same_pairs(design: ControlledDesign, kind: str, lst: WordList):
    return [(f"{o}|{a}", f"{o}|{b}") for o in design.openings(kind) for a, b in itertools.product(lst.yes, lst.no)]


def _opening_pairs(design: ControlledDesign, lst: WordList):
    openings = itertools.product(design.openings_yes, design.openings_no)
    return [(f"{py}|{w}", f"{pn}|{w}") for py, pn in openings for w in lst.yes + lst.no]


def controlled_suite(encode: Callable[[Sequence[str], Sequence[str]], Any], texts: Any, design: ControlledDesign):
    """(sequences, comparisons, averages) of the design, to join a run's `EvalSuite`.

    Each same-opening pair and opening pair is a comparison ("ctl/{split}/{chosen}>{rejected}"); each cell is an
    average of its comparisons, named as `pair_accuracies` names it ("same/{split}/{seen|new}/{list}",
    "opening/{split}/{list}"), so that the logged cell accuracy is the mean of the per-prompt ones.
    """
    prompts = controlled_prompts(texts, design)
    sequences = controlled_sets(encode, prompts, design)
    comparisons, averages = {}, {}
    for split in prompts:
        cells = {f"same/{split}/{kind}/{lst.name}": _same_pairs(design, kind, lst)
                 for kind in ("seen", "new") for lst in design.words}  # fmt: skip
        cells.update({f"opening/{split}/{lst.name}": _opening_pairs(design, lst) for lst in design.words})
        for cell, pairs in cells.items():
            names = []
            for a, b in pairs:
                name = f"ctl/{split}/{a}>{b}"
                comparisons[name] = (f"{split}/controlled/{a}", f"{split}/controlled/{b}")
                names.append(name)
            averages[cell] = tuple(names)
    return sequences, comparisons, averages


def wins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[a > b] with ties ½, elementwise (float64)."""
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def pair_accuracies(
    rewards: Mapping[str, np.ndarray], design: ControlledDesign, splits: Sequence[str] = ("train", "test")
):
    """Per-prompt accuracies of every cell, from the rewards of the design's sequence sets (`controlled_sets`
    names: "{split}/controlled/{opening}|{word}").

    Returns:
      {cell name: [P] float64}: "same/{split}/{seen|new}/{word list}" (same-opening pairs: for each prompt, the mean
      over the cell's openings and yes/no word pairs of [r+ > r−], ties ½) and "opening/{split}/{word list}"
      (opening pairs, likewise); P the split's prompts.
    """
    out: dict[str, np.ndarray] = {}
    for split in splits:
        r = {k[len(f"{split}/controlled/") :]: np.asarray(v, np.float64)
             for k, v in rewards.items() if k.startswith(f"{split}/controlled/")}  # fmt: skip
        for kind in ("seen", "new"):
            for lst in design.words:
                won = [wins(r[a], r[b]) for a, b in _same_pairs(design, kind, lst)]
                out[f"same/{split}/{kind}/{lst.name}"] = np.mean(won, axis=0)
        for lst in design.words:
            won = [wins(r[a], r[b]) for a, b in _opening_pairs(design, lst)]
            out[f"opening/{split}/{lst.name}"] = np.mean(won, axis=0)
    return out
