"""`distill tokenizer` / train_wordpiece: a BERT WordPiece vocabulary that is the same on every run when it can be."""

from __future__ import annotations

import hashlib

from transformers import AutoTokenizer

from student.tokenizer import train_wordpiece

CAPTIONS = [
    "CT of the chest shows a nodule",
    "MRI of the brain, no lesion",
    "chest x-ray: pneumonia",
    "axial ct of the abdomen",
    "the nodule is stable",
]


def _digest(folder) -> str:
    return hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()


def test_small_corpus_vocab_is_every_word_whole_and_identical_across_runs(tmp_path):
    a = train_wordpiece(CAPTIONS, tmp_path / "a", vocab_size=500)
    b = train_wordpiece(list(CAPTIONS), tmp_path / "b", vocab_size=500)
    assert _digest(a) == _digest(b)
    tok = AutoTokenizer.from_pretrained(str(a))
    words = tok.tokenize("axial ct of the abdomen shows a nodule")
    assert words == ["axial", "ct", "of", "the", "abdomen", "shows", "a", "nodule"]  # no word split
    # an unseen word made of known characters is spelled with ## pieces, not lost
    assert tok.tokenize("toes") == ["t", "##o", "##e", "##s"]
    ids = tok("ct of the chest")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids
    # the most frequent words come first (after specials and characters)
    vocab = tok.get_vocab()
    assert vocab["the"] < vocab["nodule"] < vocab["abdomen"]


def test_large_vocabulary_falls_back_to_learned_subwords_within_the_size(tmp_path):
    texts = [f"word{i} shared" for i in range(300)]  # 301 distinct words cannot all fit in 80 entries
    tok = AutoTokenizer.from_pretrained(str(train_wordpiece(texts, tmp_path / "t", vocab_size=80)))
    assert len(tok) <= 80
    assert tok.unk_token_id not in tok("word17 word263 shared")["input_ids"]  # learned pieces, not [UNK]
    assert sum(len(tok.tokenize(f"word{i}")) for i in range(300)) > 300  # not every word fits whole
