"""Train a WordPiece vocabulary on corpus captions (`distill tokenizer`), for students built without hub access.

The result is a `BertTokenizerFast` folder, loadable by `transformers.AutoTokenizer` and by open_clip's
`HFTokenizer`, so a from-scratch student's tokenizer travels with its export like BiomedCLIP's does.

Reproducibility: the `tokenizers` WordPiece trainer breaks ties between equally frequent merges in hash order,
so two trainings on the same captions can differ in a few rare pieces. Train once (`distill tokenizer`) and point
configs at the folder (`student.tokenizer_dir`) when separate runs must be comparable; a run that trains its own
keeps it in RUN/tokenizer, so resuming that run is exact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 30522,
                    lowercase: bool = True, model_max_length: int = 256) -> Path:
    """Train a BERT-style WordPiece tokenizer on `texts` and save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no non-empty captions to train a tokenizer on")
    if vocab_size < len(SPECIAL_TOKENS) + 26:
        raise ValueError(f"vocab size {vocab_size} is too small (at least {len(SPECIAL_TOKENS) + 26})")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase, unk_token="[UNK]",
                             pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                             model_max_length=model_max_length)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out
