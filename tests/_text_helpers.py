"""Synthetic English text for the tokenizer and the text-pipeline tests (no network, no data files)."""

import json

import numpy as np

WORDS = ("the whale swam under the grey sea while the captain watched from the deck and the crew sang "
         "old songs of home and harbour and the wind rose over the waves").split()


def synthetic_text(n_lines: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(n_lines)) + "\n"


CRAMMING_SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                     "cls_token": "<cls>", "sep_token": "<sep>", "mask_token": "<mask>"}


def cramming_style_tokenizer_folder(files, folder, *, vocab_size: int, seed: int = 0):
    """A tokenizer folder built the way the published UltraFastBERT tokenizers were: a BERT-normalised
    WordPiece with the specials `<pad> <unk> <cls> <sep> <mask> <s> </s>` in an arbitrary order (a
    Python set's; here a seeded shuffle), `<cls> $A <sep>` added around a text, saved by transformers'
    `PreTrainedTokenizerFast.save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(np.random.default_rng(seed).permutation(list(CRAMMING_SPECIALS.values())))
    backend = Tokenizer(models.WordPiece(unk_token="<unk>"))
    backend.normalizer = normalizers.BertNormalizer()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.train([str(f) for f in files], trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                     show_progress=False))
    backend.post_processor = processors.TemplateProcessing(
        single="<cls> $A <sep>", pair="<cls>:0 $A:0 <sep>:0 $B:1 <sep>:1",
        special_tokens=[("<cls>", backend.token_to_id("<cls>")), ("<sep>", backend.token_to_id("<sep>"))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=128, **CRAMMING_SPECIALS)
    wrapped.save_pretrained(str(folder))
    return folder


def cramming_style_tokenizer(root, *, vocab_size: int, seed: int = 0):
    """A :func:`cramming_style_tokenizer_folder` trained on 300 lines of synthetic text in ``root``, read
    back as fffjax's ``Tokenizer``."""
    from fffjax.data.tokenizer import Tokenizer

    (root / "text.txt").write_text(synthetic_text(300))
    return Tokenizer.from_pretrained(
        cramming_style_tokenizer_folder([root / "text.txt"], root / "tok", vocab_size=vocab_size, seed=seed))


def fake_text_cache(root):
    """A text cache with a tiny `sotu` corpus file and a small SpamAssassin tree (24 ham, 16 spam)."""
    (root / "corpus").mkdir(parents=True)
    (root / "corpus" / "sotu.txt").write_text(synthetic_text(400))
    spam_root = root / "raw/spam-assassin/package/data"
    for group, n in (("easy-ham-1", 24), ("spam-1", 16)):
        (spam_root / group).mkdir(parents=True)
        for i in range(n):
            words = "win money now" if "spam" in group else "the whale meeting notes"
            text = f"Subject: {words} {i}\nFrom: a@b.c\n\n{words} " * 3
            (spam_root / group / f"{i:05d}.json").write_text(
                json.dumps({"id": f"{i:05d}", "group": group, "text": text})
            )
