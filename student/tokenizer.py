"""Train a WordPiece vocabulary on corpus captions (`distill tokenizer`), for students built without hub access.

The result is a `BertTokenizerFast` folder, loadable by `transformers.AutoTokenizer` and by open_clip's
`HFTokenizer`, so a from-scratch student's tokenizer travels with its export like BiomedCLIP's does.

Reproducibility: when every distinct word fits in the vocabulary, the vocabulary is every word whole plus its
characters, the same on every run. Otherwise the `tokenizers` WordPiece trainer learns subword pieces, and it
breaks ties between equally frequent merges in hash order, so two trainings on the same captions can differ in a
few rare pieces. Train once (`distill tokenizer`) and point configs at the folder (`student.tokenizer_dir`) when
separate runs must be comparable; a run that trains its own keeps it in RUN/tokenizer, so resuming it is exact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 30522,
    lowercase: bool = True,
    model_max_length: int = 256,
) -> Path:
    """Train a BERT-style WordPiece tokenizer on `texts` and save it to `out_dir`."""
    # transformers 5: BertTokenizer is the fast (tokenizers) one; BertTokenizerFast is an alias
    from transformers import BertTokenizer  # noqa: PLC0415 (lazy: transformers, seconds, after `distill tokenizer` checked its corpus)

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no non-empty captions to train a tokenizer on")
    if vocab_size < len(SPECIAL_TOKENS) + 26:
        raise ValueError(f"vocab size {vocab_size} is too small (at least {len(SPECIAL_TOKENS) + 26})")
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre = pre_tokenizers.BertPreTokenizer()
    vocab = _whole_word_vocab(texts, normalizer, pre, vocab_size)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]") if vocab else models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    if vocab is None:  # more distinct words than the vocabulary holds: learn subword pieces
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1)
        tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = BertTokenizer(
        tokenizer_object=tok,
        do_lower_case=lowercase,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def _whole_word_vocab(texts: list[str], normalizer, pre, vocab_size: int) -> dict[str, int] | None:
    """Every word whole (plus each character, alone and as a `##` piece, for unseen words), when it all fits.

    Why: when the vocabulary can hold every distinct word, no word needs splitting, so learned merges add nothing;
    and this vocabulary is the same on every run (ordered by frequency, ties by spelling), where the subword
    trainer's tie order is not. Returns None when the words do not fit.
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    pieces = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    if len(pieces) + len(words) > vocab_size:
        return None
    return {p: i for i, p in enumerate(pieces + words)}
