"""CLIP's byte-level BPE tokenizer, producing the (B, 77) token ids Stable Diffusion's text encoder reads.

Text is NFC-normalised, runs of whitespace become one space, and everything is lowercased. CLIP's
regex then splits it into words, single digits, runs of punctuation and English contractions
('s, 't, ...); whitespace is dropped. Each piece is mapped byte by byte to printable characters
(GPT-2's byte-level trick, so nothing is ever out of vocabulary) and merged by BPE, the last
symbol of a word carrying the suffix "</w>". Every prompt becomes
`<|startoftext|> tokens <|endoftext|>`, truncated to 77 ids (the EOS is kept) and padded to 77:
SD1 pads with <|endoftext|>, SD2 (trained with open_clip's tokenizer) with id 0, the token "!".

The vocabulary comes from any of the files it is distributed in (see `CLIPTokenizer.from_path`).
"""
import gzip
import json
import logging
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

log = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD_WITHOUT_EOS = "!"  # id 0: what open_clip, hence SD2, pads with
END_OF_WORD = "</w>"
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

OPENAI_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
OPENAI_NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of that file (vocab size 49408)

WHERE_TO_GET_A_VOCABULARY = (
    "the CLIP vocabulary is needed: either a 'tokenizer/' folder of a Stable Diffusion diffusers repository "
    "(vocab.json + merges.txt), a tokenizer.json, or OpenAI's bpe_simple_vocab_16e6.txt.gz "
    "(shipped with github.com/openai/CLIP and in the open_clip_torch package)")


class TokenizerFilesNotFoundError(FileNotFoundError):
    """No vocabulary file where the user pointed."""


class TokenizerFileError(ValueError):
    """A vocabulary file exists but does not hold a CLIP vocabulary."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from each byte to a printable character. Printable Latin-1 bytes
    map to themselves, the others to chr(256), chr(257), ... in byte order. The order of this dict
    is the order of the first 256 vocabulary entries."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    mapping |= {b: chr(256 + i) for i, b in enumerate(others)}
    return mapping


# ---------------------------------------------------------------------------------------------
# Readers: each returns (vocab: token -> id, merges: [(left, right), ...] in priority order)


def read_openai_bpe(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI's merges file. The vocabulary is implied, built the way OpenAI CLIP builds it: the 256
    byte characters, the same with "</w>", one token per merge, then the two special tokens."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"{path}: not a gzip-compressed text file ({e})") from None
    merges = [tuple(line.split()) for line in lines[1:1 + OPENAI_NUM_MERGES]]  # line 0 is a version header
    if len(merges) != OPENAI_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerFileError(f"{path}: expected {OPENAI_NUM_MERGES} BPE merges 'left right' after "
                                 "the header line; this is not OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz")
    return clip_vocabulary(merges), merges


def clip_vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    """The vocabulary implied by a merge list: the 256 byte characters, the same with "</w>", one
    token per merge, then the two special tokens (OpenAI CLIP's construction)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def read_vocab_and_merges(vocab_path: Path, merges_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A diffusers/transformers `tokenizer/` folder: vocab.json and merges.txt ("#version" header)."""
    vocab = _read_json(vocab_path)
    lines = merges_path.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return vocab, _checked_merges(merges, merges_path)


def read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A `tokenizers` tokenizer.json. Only its vocabulary is taken: the pipeline around it is always
    CLIP's own, whatever version of transformers wrote the file."""
    model = _read_json(path).get("model", {})
    if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
        raise TokenizerFileError(f"{path}: not a BPE tokenizer with vocab and merges "
                                 f"(model type {model.get('type')!r})")
    # Merges are "left right" strings in older files and [left, right] pairs in newer ones.
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], _checked_merges(merges, path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"{path}: not valid JSON ({e})") from None


def _checked_merges(merges: list[tuple], path: Path) -> list[tuple[str, str]]:
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise TokenizerFileError(f"{path}: a BPE merge must be two symbols, got {bad!r}")
    return merges


def find_vocabulary(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read the vocabulary from a file, or from a folder holding one (also a diffusers model folder,
    whose vocabulary sits in tokenizer/)."""
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".txt.gz"):
            return read_openai_bpe(path)
        if path.name == "vocab.json":
            return _vocab_and_merges_in(path.parent)
        if path.suffix == ".json":
            return read_tokenizer_json(path)
        raise TokenizerFileError(f"{path}: unknown vocabulary format; {WHERE_TO_GET_A_VOCABULARY}")
    for folder in (path, path / "tokenizer"):
        if (folder / "vocab.json").is_file():
            return _vocab_and_merges_in(folder)
        if (folder / "tokenizer.json").is_file():
            return read_tokenizer_json(folder / "tokenizer.json")
        if (folder / OPENAI_BPE_FILE).is_file():
            return read_openai_bpe(folder / OPENAI_BPE_FILE)
    raise TokenizerFilesNotFoundError(f"no tokenizer vocabulary at {path}: {WHERE_TO_GET_A_VOCABULARY}")


def _vocab_and_merges_in(folder: Path):
    merges = folder / "merges.txt"
    if not merges.is_file():
        raise TokenizerFilesNotFoundError(f"{folder / 'vocab.json'} needs merges.txt beside it; "
                                          f"{WHERE_TO_GET_A_VOCABULARY}")
    return read_vocab_and_merges(folder / "vocab.json", merges)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _token_id(vocab: dict[str, int], token: str) -> int:
    if token not in vocab:
        raise TokenizerFileError(f"the vocabulary has no {token!r} token; it is not a CLIP vocabulary")
    return vocab[token]


class CLIPTokenizer:
    """prompts -> LongTensor (B, context_length) of CLIP token ids."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_with_eos: bool = True,
                 context_length: int = 77):
        self.bos_id, self.eos_id = _token_id(vocab, BOS), _token_id(vocab, EOS)
        pad = EOS if pad_with_eos else PAD_WITHOUT_EOS
        self.pad_id = _token_id(vocab, pad)
        self.context_length = context_length

        # Every byte has a token, so the unknown token is never produced; BPE insists on having one.
        tok = Tokenizer(BPE(vocab, merges, unk_token=EOS, end_of_word_suffix=END_OF_WORD,
                            continuing_subword_prefix="", fuse_unk=False))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),  # keep the matches
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> characters only
        ])
        # Special tokens typed in a prompt map to their ids, in any case, as in OpenAI CLIP (which
        # lowercases first). Only BOS and EOS are special: SD2's pad "!" inside a prompt is punctuation.
        tok.add_special_tokens([AddedToken(BOS, special=True, normalized=True),
                                AddedToken(EOS, special=True, normalized=True)])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, self.bos_id), (EOS, self.eos_id)])
        # Truncation leaves room for BOS and EOS, so a long prompt still ends with EOS.
        tok.enable_truncation(max_length=context_length)
        tok.enable_padding(length=context_length, pad_id=self.pad_id, pad_token=pad)
        self.tokenizer = tok
        self._warned = set()  # prompts whose truncation was reported

    @classmethod
    def byte_level(cls, pad_with_eos: bool = True, context_length: int = 77) -> "CLIPTokenizer":
        """CLIP's tokenizer with no merges: one token per byte (514 ids). Needs no vocabulary file, so
        the tiny offline preset (model/config.py's TINY) uses it."""
        return cls(clip_vocabulary([]), [], pad_with_eos, context_length)

    @classmethod
    def from_path(cls, path, pad_with_eos: bool = True, context_length: int = 77) -> "CLIPTokenizer":
        """From vocab.json (+ merges.txt beside it), tokenizer.json, bpe_simple_vocab_16e6.txt.gz, or
        a folder holding one of them directly or in tokenizer/ (a diffusers model folder)."""
        vocab, merges = find_vocabulary(Path(path))
        return cls(vocab, merges, pad_with_eos, context_length)

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        encodings = self.tokenizer.encode_batch(list(prompts))
        for prompt, encoding in zip(prompts, encodings):
            self._warn_if_truncated(prompt, encoding)
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)

    def _warn_if_truncated(self, prompt: str, encoding):
        """The text encoder reads 77 tokens: say once per prompt how many of its tokens were dropped."""
        dropped = sum(real and not special for part in encoding.overflowing
                      for real, special in zip(part.attention_mask, part.special_tokens_mask))
        if dropped and prompt not in self._warned:
            self._warned.add(prompt)
            log.warning("prompt %r is longer than CLIP's %d tokens: its last %d tokens were dropped",
                        prompt if len(prompt) <= 60 else prompt[:57] + "...", self.context_length, dropped)
