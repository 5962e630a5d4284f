"""Text datasets as GLC used them: Twitter part-of-speech tagging and binary SST.

Both return integer feature ids (int64 ``LongTensor``, id 0 = padding) for an embedding
model, and store the id space as ``dataset.extra["vocab_size"]`` (ids lie in
``[0, vocab_size)``).

``twitter_pos`` (``ROOT/twitter-pos/``): one example per token, 25 tags in GLC's order.
As GLC does, ``tweets-train.txt`` + ``tweets-dev.txt`` form the training set (19,442
tokens) and ``tweets-devtest.txt`` the test set (7,152 tokens); each token is seen in a
±1-token window, tweets padded with ``</s>`` on both sides. GLC's 50-d embeddings are not
available, so each window position ``p`` in (-1, 0, +1) contributes :data:`SLOTS` (15)
features, ``x.shape == (N, 45)``, column ``p_index * 15 + slot``:

* ``word``: hashed word (CRC-32 mod ``word_buckets``),
* ``cluster``: the word's Brown cluster (CMU Twitter clusters, ``6mpaths``; exact word, else
  lower-cased, else "none"), and ``cluster:2``…``cluster:12``: prefixes of its bit path,
* ``prefix1..3`` / ``suffix1..3``: hashed first/last 1–3 characters (mod ``affix_buckets``),
* ``shape``: boundary, mention, URL, hashtag, number, has-digit, punctuation, letters, other.

Every (position, slot) has its own id range, so one embedding table (e.g.
``nn.EmbeddingBag(vocab_size, d, mode="sum")`` or an embedding per column + MLP) tells the
positions apart; no example uses id 0.

``sst`` (``ROOT/sst/``): GLC's preprocessing (non-word characters → spaces, lower case,
NLTK stop words removed, label = last character). As GLC does, ``senti.binary.train`` +
``senti.binary.dev`` form the training set and ``senti.binary.test`` the test set; the
vocabulary is the ``vocab_size`` (10,000) most frequent words of ``senti.binary.train``.
Ids: 0 = padding, 1 = unknown, 2.. = words by frequency. Phrases are right-padded to
``L = min(longest phrase, max_len)`` (``max_len`` = 30 as GLC); a longer phrase keeps its
last ``max_len`` tokens (GLC's truncation); a phrase left empty becomes a single unknown.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .base import Dataset, DatasetInfo, register, require_file, resolve_data_dir

# GLC's tag numbering (Twitter_experiments_pytorch.py, tag_to_number)
TAGS = ["N", "O", "S", "^", "Z", "L", "M", "V", "A", "R", "!", "D", "P", "&", "T", "X", "Y", "#", "@", "~", "U",
        "E", "$", ",", "G"]
BOUNDARY = "</s>"
WINDOW = 1
CLUSTER_PREFIXES = (2, 4, 6, 8, 10, 12)
AFFIXES = (1, 2, 3)
SHAPES = ["boundary", "mention", "url", "hashtag", "number", "has-digit", "punctuation", "letters", "other"]
SLOTS = (["word", "cluster"] + [f"cluster:{k}" for k in CLUSTER_PREFIXES]
         + [f"prefix{k}" for k in AFFIXES] + [f"suffix{k}" for k in AFFIXES] + ["shape"])
TWITTER_SOURCE = ("GLC's Twitter data (github.com/mmazeika/glc, data/Tweets: the CMU Twitter POS oct27 splits) "
                  "and the CMU Twitter Brown clusters 6mpaths (github.com/brendano/ark-tweet-nlp)")
SST_SOURCE = "GLC's SST files (github.com/mmazeika/glc, SST/data/SST/senti.binary.*)"

# NLTK's English stop words, as listed in GLC's SST_experiments_pytorch.py
STOP_WORDS = frozenset("""i me my myself we our ours ourselves you your yours yourself yourselves he him his himself
she her hers herself it its itself they them their theirs themselves what which who whom this that these those am
is are was were be been being have has had having do does did doing a an the and but if or because as until while
of at by for with about against between into through during before after above below to from up down in out on off
over under again further then once here there when where why how all any both each few more most other some such no
nor not only own same so than too very s t can will just don should now d ll m o re ve y ain aren couldn didn doesn
hadn hasn haven isn ma mightn mustn needn shan shouldn wasn weren won wouldn""".split())


def _attach_extra(ds: Dataset, extra: dict) -> Dataset:
    """Store ``extra`` on the dataset (a dynamic attribute until :class:`Dataset` has the field)."""
    current = getattr(ds, "extra", None) or {}
    current.update(extra)
    ds.extra = current
    return ds


# ----------------------------------------------------------------------------- Twitter
def read_tagged(path: Path) -> list[list[tuple[str, str]]]:
    """Tweets from a ``word<TAB>tag`` file, blank lines between tweets (checked tags)."""
    tweets, current = [], []
    tag_set = set(TAGS)
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                if current:
                    tweets.append(current)
                current = []
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0]:
                raise ValueError(f"{path}, line {n}: expected 'word<TAB>tag', got {line!r}")
            if parts[1] not in tag_set:
                raise ValueError(f"{path}, line {n}: unknown tag {parts[1]!r}; expected one of {' '.join(TAGS)}")
            current.append((parts[0], parts[1]))
    if current:
        tweets.append(current)
    if not tweets:
        raise ValueError(f"{path}: no tagged tokens")
    return tweets


def read_clusters(path: Path) -> dict[str, str]:
    """``bitpath<TAB>word<TAB>count`` lines as ``{word: bitpath}``."""
    clusters = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3 or not parts[0] or set(parts[0]) - {"0", "1"}:
                raise ValueError(f"{path}, line {n}: expected 'bitpath<TAB>word<TAB>count', got {line.strip()!r}")
            clusters[parts[1]] = parts[0]
    return clusters


def word_shape(word: str) -> str:
    if word == BOUNDARY:
        return "boundary"
    if word.startswith("@") or word.startswith("<@"):
        return "mention"
    if word.startswith("<URL") or word.startswith("http") or word.startswith("www."):
        return "url"
    if word.startswith("#") and len(word) > 1:
        return "hashtag"
    if re.fullmatch(r"[+-]?[\d.,:/]*\d[\d.,:/]*", word):
        return "number"
    if any(ch.isdigit() for ch in word):
        return "has-digit"
    if not any(ch.isalnum() for ch in word):
        return "punctuation"
    if word.isalpha():
        return "letters"
    return "other"


def _hash(text: str, buckets: int) -> int:
    return zlib.crc32(text.encode("utf-8")) % buckets


class TwitterFeaturizer:
    """Maps a ±1 window of words to :data:`SLOTS` feature ids per position (see module doc)."""

    def __init__(self, clusters: dict[str, str], word_buckets: int = 8192, affix_buckets: int = 2048):
        self.clusters = clusters
        paths = sorted(set(clusters.values()))
        self.cluster_ids = {p: i + 1 for i, p in enumerate(paths)}  # 0 = no cluster
        self.prefix_ids = {k: {p: i + 1 for i, p in enumerate(sorted({q[:k] for q in paths}))}
                           for k in CLUSTER_PREFIXES}
        self.word_buckets, self.affix_buckets = int(word_buckets), int(affix_buckets)
        sizes = ([self.word_buckets, len(paths) + 1] + [len(self.prefix_ids[k]) + 1 for k in CLUSTER_PREFIXES]
                 + [self.affix_buckets] * (2 * len(AFFIXES)) + [len(SHAPES)])
        positions = 2 * WINDOW + 1
        all_sizes = np.array(sizes * positions, dtype=np.int64)
        self.offsets = 1 + np.concatenate([[0], np.cumsum(all_sizes)[:-1]])  # 0 stays padding
        self.vocab_size = int(1 + all_sizes.sum())
        self.features_per_example = len(SLOTS) * positions
        self.slot_names = [f"{p:+d}:{s}" for p in range(-WINDOW, WINDOW + 1) for s in SLOTS]
        self._cache: dict[str, list[int]] = {}

    def local_ids(self, word: str) -> list[int]:
        """Ids of one word within each slot's range (before the slot offsets)."""
        ids = self._cache.get(word)
        if ids is None:
            path = self.clusters.get(word) or self.clusters.get(word.lower())
            ids = [_hash(word, self.word_buckets), self.cluster_ids[path] if path else 0]
            ids += [self.prefix_ids[k][path[:k]] if path else 0 for k in CLUSTER_PREFIXES]
            ids += [_hash(f"p{k}:{word[:k]}", self.affix_buckets) for k in AFFIXES]
            ids += [_hash(f"s{k}:{word[-k:]}", self.affix_buckets) for k in AFFIXES]
            ids.append(SHAPES.index(word_shape(word)))
            self._cache[word] = ids
        return ids

    def featurize(self, tweets: list[list[tuple[str, str]]]) -> tuple[np.ndarray, np.ndarray]:
        rows, labels = [], []
        for tweet in tweets:
            words = [BOUNDARY] * WINDOW + [w for w, _ in tweet] + [BOUNDARY] * WINDOW
            local = [self.local_ids(w) for w in words]
            for i, (_, tag) in enumerate(tweet):
                rows.append([v for j in range(i, i + 2 * WINDOW + 1) for v in local[j]])
                labels.append(TAGS.index(tag))
        x = np.asarray(rows, dtype=np.int64) + self.offsets[None, :]
        return x, np.asarray(labels, dtype=np.int64)


def load_twitter_pos(data_dir=None, word_buckets: int = 8192, affix_buckets: int = 2048) -> Dataset:
    """Twitter POS tagging: int64 ``N×45`` window features, 25 tags (see module doc)."""
    folder = resolve_data_dir(data_dir) / "twitter-pos"
    files = {n: require_file(folder / n, TWITTER_SOURCE)
             for n in ("tweets-train.txt", "tweets-dev.txt", "tweets-devtest.txt", "6mpaths")}
    feat = TwitterFeaturizer(read_clusters(files["6mpaths"]), word_buckets, affix_buckets)
    x_tr, y_tr = feat.featurize(read_tagged(files["tweets-train.txt"]) + read_tagged(files["tweets-dev.txt"]))
    x_te, y_te = feat.featurize(read_tagged(files["tweets-devtest.txt"]))
    ds = Dataset(name="twitter_pos", x_train=torch.from_numpy(x_tr), y_train=y_tr, x_test=torch.from_numpy(x_te),
                 y_test=y_te, num_classes=len(TAGS), class_names=list(TAGS),
                 description=(f"Twitter POS (GLC's splits: train+dev / devtest), {len(y_tr):,} train / "
                              f"{len(y_te):,} test tokens, 25 tags; x = int64 N×{feat.features_per_example} "
                              f"feature ids (±1 window × {len(SLOTS)}: hashed word, Brown cluster + prefixes, "
                              f"hashed affixes, shape), vocab {feat.vocab_size:,}, 0 = padding"),
                 licence="CC-BY 3.0 (CMU Twitter POS data); Brown clusters: ark-tweet-nlp package licence (GPL-2.0+)")
    return _attach_extra(ds, {"vocab_size": feat.vocab_size, "features_per_example": feat.features_per_example,
                              "feature_names": feat.slot_names, "window": WINDOW})


# ----------------------------------------------------------------------------- SST
def read_sst(path: Path, stop_words: frozenset[str] = STOP_WORDS) -> tuple[list[list[str]], np.ndarray]:
    """GLC's SST preprocessing: ``(token lists, labels)``; label = last character (0/1)."""
    texts, labels = [], []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            clean = re.sub(r"\W+", " ", line).strip().lower()
            if not clean or clean[-1] not in "01" or (len(clean) > 1 and clean[-2] != " "):
                raise ValueError(f"{path}, line {n}: expected a phrase ending in a 0/1 label, got {line.strip()!r}")
            texts.append([w for w in clean[:-1].split() if w not in stop_words])
            labels.append(int(clean[-1]))
    if not texts:
        raise ValueError(f"{path}: no labelled phrases")
    return texts, np.asarray(labels, dtype=np.int64)


def build_vocab(texts: list[list[str]], size: int) -> dict[str, int]:
    """The ``size`` most frequent words (ties: first seen first) → ids 2, 3, …"""
    counts = Counter(w for t in texts for w in t)  # insertion order = first occurrence
    ranked = sorted(counts, key=lambda w: -counts[w])[:size]  # stable sort keeps first-seen order on ties
    return {w: i + 2 for i, w in enumerate(ranked)}


def encode(texts: list[list[str]], vocab: dict[str, int], length: int) -> np.ndarray:
    """Right-padded ids (0 = pad, 1 = unknown), each phrase's last ``length`` tokens."""
    out = np.zeros((len(texts), length), dtype=np.int64)
    for i, words in enumerate(texts):
        ids = [vocab.get(w, 1) for w in words][-length:] or [1]
        out[i, :len(ids)] = ids
    return out


def load_sst(data_dir=None, vocab_size: int = 10000, max_len: int = 30, remove_stop_words: bool = True) -> Dataset:
    """Binary SST as GLC used it: int64 ``N×L`` token ids (see module doc)."""
    folder = resolve_data_dir(data_dir) / "sst"
    files = {s: require_file(folder / f"senti.binary.{s}", SST_SOURCE) for s in ("train", "dev", "test")}
    stop = STOP_WORDS if remove_stop_words else frozenset()
    parts = {s: read_sst(p, stop) for s, p in files.items()}
    vocab = build_vocab(parts["train"][0], int(vocab_size))
    train_texts = parts["train"][0] + parts["dev"][0]
    y_train = np.concatenate([parts["train"][1], parts["dev"][1]])
    longest = max(len(t) for t in train_texts + parts["test"][0])
    length = max(1, min(longest, int(max_len)))
    x_train, x_test = encode(train_texts, vocab, length), encode(parts["test"][0], vocab, length)
    ds = Dataset(name="sst", x_train=torch.from_numpy(x_train), y_train=y_train, x_test=torch.from_numpy(x_test),
                 y_test=parts["test"][1], num_classes=2, class_names=["negative", "positive"],
                 description=(f"Stanford Sentiment Treebank, binary phrases (GLC's splits: train+dev / test), "
                              f"{len(y_train):,} train / {len(parts['test'][1]):,} test; x = int64 N×{length} "
                              f"token ids, right-padded, vocab {len(vocab) + 2:,} (0 = pad, 1 = unknown)"),
                 licence="see GLC-LICENSE (Apache-2.0); SST: no licence stated")
    itos = ["<pad>", "<unk>"] + sorted(vocab, key=vocab.get)
    return _attach_extra(ds, {"vocab_size": len(vocab) + 2, "max_len": length, "pad_id": 0, "unk_id": 1,
                              "itos": itos})


register(DatasetInfo(name="twitter_pos", loader=load_twitter_pos,
                     description="Twitter part-of-speech tagging (GLC), 25 tags, ±1-token window features",
                     folder="twitter-pos",
                     files=("tweets-train.txt", "tweets-dev.txt", "tweets-devtest.txt", "6mpaths"),
                     source=TWITTER_SOURCE,
                     licence="CC-BY 3.0 data; Brown clusters: ark-tweet-nlp package licence (GPL-2.0+)"))
register(DatasetInfo(name="sst", loader=load_sst, description="Stanford Sentiment Treebank, binary (GLC), word ids",
                     folder="sst", files=("senti.binary.train", "senti.binary.dev", "senti.binary.test"),
                     source=SST_SOURCE, licence="see GLC-LICENSE (Apache-2.0)"))
