"""CLIP tokenizer: same ids as transformers' CLIPTokenizer on the real CLIP vocabulary, from every file
format the vocabulary ships in.

The real vocabulary is OpenAI's bpe_simple_vocab_16e6.txt.gz, taken from the open_clip_torch wheel on
PyPI (downloaded once, never installed) and cached in ~/.cache/svp-test-data/.
"""
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer as HFCLIPTokenizer

from model.tokenizer import CLIPTokenizer, TokenizerFileError, TokenizerFilesNotFoundError, read_openai_bpe

PROMPTS = [
    "a photo of a cat",
    "a photo of sks person, smiling",
    "A PHOTO of an Astronaut riding a horse on Mars!!!",
    "portrait, 4k, 8K uhd, f/1.8 85mm, (masterpiece:1.2), [ugly], {a|b}",
    "price: $1,299.99 — 50% off... really?!",
    "café naïve Ünïcödé e\u0301 ß Æsir ﬁne",
    "日本語のテキスト, Привет мир, مرحبا, नमस्ते",
    "emoji 😀🔥👍🏽 ❤️ and ☃",
    "   leading and   trailing \n\n\t tabs and newlines  \r\n",
    "it's the dog's bone, don't! we'll they're I'm you've he'd o'clock ’s",
    "<b>bold</b> &amp; <a href='x.html'>link</a> &lt;3 &#39;",
    "",
    " ".join(["word"] * 100),
    "a, " * 60,
    " ".join(["x"] * 75),  # exactly fills 77 with BOS and EOS
    " ".join(["x"] * 76),  # one too many
]


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_folder) -> HFCLIPTokenizer:
    return HFCLIPTokenizer.from_pretrained(str(tokenizer_folder))


def hf_ids(hf: HFCLIPTokenizer, prompts, pad_id=None) -> torch.Tensor:
    """What diffusers' pipelines feed the text encoder; `pad_id` overrides the padding id."""
    batch = hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    if pad_id is None:
        return batch.input_ids
    return batch.input_ids.masked_fill(batch.attention_mask == 0, pad_id)


def test_vocabulary_is_clip_vocabulary(openai_bpe_file):
    vocab, merges = read_openai_bpe(openai_bpe_file)
    assert len(vocab) == 49408 and len(set(vocab.values())) == 49408
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab["!"]) == (49406, 49407, 0)
    # Ids of the published openai/clip-vit-large-patch14 vocab.json, which the derived vocab must reproduce.
    assert CLIPTokenizer(vocab, merges)("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368,
                                                                                 49407]


def test_sd1_ids_match_transformers(tokenizer_folder, hf_tokenizer):
    ours = CLIPTokenizer.from_path(tokenizer_folder, pad_with_eos=True)
    expected = hf_ids(hf_tokenizer, PROMPTS)
    got = ours(PROMPTS)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), 77)
    for prompt, e, g in zip(PROMPTS, expected, got):
        assert g.tolist() == e.tolist(), prompt


def test_sd2_pads_with_zero_like_open_clip(tokenizer_folder, hf_tokenizer):
    """open_clip (SD2's tokenizer) writes [SOT] tokens [EOT] and zeros after: the SD1 ids with id 0 as padding."""
    ours = CLIPTokenizer.from_path(tokenizer_folder, pad_with_eos=False)
    assert ours.pad_id == 0
    assert torch.equal(ours(PROMPTS), hf_ids(hf_tokenizer, PROMPTS, pad_id=0))


def test_sd2_matches_diffusers_sd2_tokenizer_on_prompts_without_exclamation_marks(tokenizer_folder):
    """diffusers' SD2 tokenizer declares pad_token "!", which transformers then also splits out of the
    prompt as a special token (id 0); open_clip, which SD2 was trained with, reads "!" as punctuation.
    We follow open_clip, so the two agree exactly on prompts without "!"."""
    hf_sd2 = HFCLIPTokenizer.from_pretrained(str(tokenizer_folder), pad_token="!")
    ours = CLIPTokenizer.from_path(tokenizer_folder, pad_with_eos=False)
    prompts = [p for p in PROMPTS if "!" not in p]
    assert torch.equal(ours(prompts), hf_ids(hf_sd2, prompts))
    sd1 = CLIPTokenizer.from_path(tokenizer_folder, pad_with_eos=True)
    assert ours("hello!")[0, :4].tolist() == sd1("hello!")[0, :4].tolist()  # BOS hello ! EOS


def test_truncation_keeps_eos_and_single_prompt_is_a_batch(tokenizer_folder):
    ours = CLIPTokenizer.from_path(tokenizer_folder)
    ids = ours(" ".join(["word"] * 100))
    assert ids.shape == (1, 77)
    assert ids[0, 0] == ours.bos_id and ids[0, -1] == ours.eos_id
    assert (ids[0, 1:-1] != ours.eos_id).all()


def test_special_tokens_in_a_prompt_ignore_case(tokenizer_folder):
    """OpenAI CLIP lowercases before it looks for special tokens."""
    ours = CLIPTokenizer.from_path(tokenizer_folder)
    assert torch.equal(ours("a <|ENDOFTEXT|> b"), ours("a <|endoftext|> b"))
    assert ours("a <|endoftext|> b")[0, 2] == ours.eos_id


def test_every_vocabulary_format_gives_the_same_ids(openai_bpe_file, tokenizer_folder, hf_tokenizer, tmp_path):
    hf_tokenizer.save_pretrained(str(tmp_path / "saved"))  # writes tokenizer.json as transformers does
    tokenizer_json = tmp_path / "saved" / "tokenizer.json"
    # Older tokenizer.json files store merges as "left right" strings instead of pairs.
    legacy = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    legacy["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in legacy["model"]["merges"]]
    legacy_json = tmp_path / "legacy.json"
    legacy_json.write_text(json.dumps(legacy, ensure_ascii=False), encoding="utf-8")

    sources = [openai_bpe_file, openai_bpe_file.parent, tokenizer_folder, tokenizer_folder / "vocab.json",
               tokenizer_folder.parent,  # a diffusers model folder: the vocabulary is in tokenizer/
               tokenizer_json, tmp_path / "saved", legacy_json]
    expected = CLIPTokenizer.from_path(openai_bpe_file)(PROMPTS)
    for source in sources:
        assert torch.equal(CLIPTokenizer.from_path(source)(PROMPTS), expected), source


def test_missing_vocabulary_says_which_file_to_get(tmp_path):
    with pytest.raises(TokenizerFilesNotFoundError, match=r"vocab.json.*bpe_simple_vocab_16e6.txt.gz") as e:
        CLIPTokenizer.from_path(tmp_path)
    assert str(tmp_path) in str(e.value) and "tokenizer/" in str(e.value)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerFilesNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_path(tmp_path)


def test_wrong_files_are_reported(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(TokenizerFileError, match="not a BPE tokenizer"):
        CLIPTokenizer.from_path(tmp_path / "tokenizer.json")
    (tmp_path / "broken.txt.gz").write_text("not gzip")
    with pytest.raises(TokenizerFileError, match="broken.txt.gz: not a gzip"):
        CLIPTokenizer.from_path(tmp_path / "broken.txt.gz")
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerFileError, match=re.escape("no '<|startoftext|>' token")):
        CLIPTokenizer.from_path(tmp_path)
