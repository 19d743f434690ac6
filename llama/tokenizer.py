"""The tokenizers of Meta's Llama families, as Meta's references wrap them.

`Tokenizer(model_path)` opens either kind of `tokenizer.model`: a
SentencePiece model (Llama 2, Code Llama) or a tiktoken BPE file of
`base64-token rank` lines (Llama 3.x), which gives a `Llama3Tokenizer`.
Both have the same interface: `n_words`, `bos_id`, `eos_id`, `pad_id`,
`encode(s, bos, eos)`, `decode(t)` and `decode_pieces(t)`.
"""

import base64
import binascii
import os
import re
from pathlib import Path
from typing import AbstractSet, Dict, Iterator, List, Optional, Sequence, Union

from sentencepiece import SentencePieceProcessor

SENTENCEPIECE = "sentencepiece"
TIKTOKEN = "tiktoken"

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")


def check_tokenizer_file(model_path) -> None:
    """Raise unless `model_path` names a file: ValueError for None, IsADirectoryError
    for a directory (naming the tokenizer.model in it, if there is one),
    FileNotFoundError for a path that does not exist."""
    if model_path is None:
        raise ValueError("a tokenizer model path is required, got None")
    if os.path.isdir(model_path):
        inside = os.path.join(model_path, "tokenizer.model")
        hint = f"; did you mean {inside!r}?" if os.path.isfile(inside) else ""
        raise IsADirectoryError(f"{str(model_path)!r} is a directory, not a tokenizer model file{hint}")
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"tokenizer model not found: {str(model_path)!r}")


def tokenizer_beside(ckpt_dir) -> Optional[str]:
    """The tokenizer.model in `ckpt_dir`, else the one in its parent (where Meta's Llama 2
    download keeps it, beside the model folders); None if neither exists."""
    for candidate in (Path(ckpt_dir) / "tokenizer.model", Path(ckpt_dir).parent / "tokenizer.model"):
        if candidate.is_file():
            return str(candidate)
    return None


def tokenizer_kind(model_path) -> str:
    """SENTENCEPIECE or TIKTOKEN, from the file's first line (tiktoken files are text)."""
    check_tokenizer_file(model_path)
    with open(model_path, "rb") as f:
        first_line = f.readline(256).rstrip(b"\r\n")
    return TIKTOKEN if _TIKTOKEN_LINE.fullmatch(first_line) else SENTENCEPIECE


# Code Llama's infilling pieces: prefix, suffix, middle and end of infilling.
PREFIX_PIECE, SUFFIX_PIECE, MIDDLE_PIECE, EOT_PIECE = "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"
# Encoded before text that must not get a leading space, then dropped (Meta's trick).
_INFILL_MARKER = "☺"


def check_encodable(text, what: str) -> None:
    """Raise ValueError, naming `what` and the position, if `text` (a str) holds a
    lone surrogate: such a str has no UTF-8 form, so no tokenizer can encode it."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} holds a lone surrogate {text[e.start]!r} at position {e.start}: it is not valid "
            "Unicode and cannot be encoded (pair it, or decode your bytes with errors='replace')"
        ) from None


def check_special_ids(tokenizer) -> None:
    """Raise ValueError unless `tokenizer` has BOS and EOS tokens within its vocabulary:
    generation starts each prompt with BOS and ends at EOS."""
    for name in ("bos_id", "eos_id"):
        value = getattr(tokenizer, name)
        if not 0 <= value < tokenizer.n_words:
            raise ValueError(
                f"the tokenizer has no {name[:3].upper()} token ({name} = {value}); "
                "Llama needs a tokenizer with both BOS and EOS"
            )


class Tokenizer:
    """Encodes text to token ids and back with a SentencePiece model.

    Given a tiktoken BPE file instead, `Tokenizer(path)` returns a
    `Llama3Tokenizer`, so that code written for either family opens its
    tokenizer the same way.
    """

    def __new__(cls, model_path: Optional[str] = None):
        # (No path: copy.copy and pickle make an empty instance, then fill it.)
        if cls is Tokenizer and model_path is not None and tokenizer_kind(model_path) == TIKTOKEN:
            return super().__new__(Llama3Tokenizer)
        return super().__new__(cls)

    kind = SENTENCEPIECE

    def __init__(self, model_path: str):
        check_tokenizer_file(model_path)
        try:
            self.sp_model = SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_path!r} is not a SentencePiece model: {e}") from e

        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()

        # Code Llama's infilling pieces (7B and 13B models), found by piece;
        # None in a tokenizer without them, such as Llama 2's.
        self.prefix_id: Optional[int] = self._piece_id(PREFIX_PIECE)
        self.suffix_id: Optional[int] = self._piece_id(SUFFIX_PIECE)
        self.middle_id: Optional[int] = self._piece_id(MIDDLE_PIECE)
        self.eot_id: Optional[int] = self._piece_id(EOT_PIECE)

    def _piece_id(self, piece: str) -> Optional[int]:
        # piece_to_id answers unknown pieces with the unk id; check the round trip.
        piece_id = self.sp_model.piece_to_id(piece)
        return piece_id if self.sp_model.id_to_piece(piece_id) == piece else None

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Token ids of `s`, with BOS first and EOS last when asked."""
        check_encodable(s, "the text to encode")
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t) -> str:
        """Text of a list of token ids (or of a single id)."""
        return self.sp_model.decode(t)

    def encode_infilling(self, s: str) -> List[int]:
        """Token ids of `s` without the implicit leading space SentencePiece adds.

        As in Meta's Code Llama: `s` is encoded behind a marker character,
        whose tokens are then dropped (so " x" keeps its space and "x" gets none).
        """
        check_encodable(s, "the text to encode")
        return self.sp_model.encode(_INFILL_MARKER + s)[len(self._marker_ids()) :]

    def decode_infilling(self, t: Sequence[int]) -> str:
        """Text of `t` without dropping a leading space (the inverse of `encode_infilling`)."""
        marker_ids = self._marker_ids()
        return self.sp_model.decode(marker_ids + list(t))[len(self.sp_model.decode(marker_ids)) :]

    def _marker_ids(self) -> List[int]:
        # ["▁", "☺"] in Llama 2's and Code Llama's vocabularies (Meta drops
        # exactly 2 tokens); byte pieces in a vocabulary that lacks the marker.
        return self.sp_model.encode(_INFILL_MARKER)

    def decode_pieces(self, t: Sequence[int]) -> List[str]:
        """One string per token, so that `"".join(...) == decode(t)`.

        SentencePiece spreads a character outside the vocabulary over
        several byte tokens; the tokens before its last byte get "" and the
        last one the whole character. A word's leading space stays with its
        token (the reference's `decode(token)` drops it).
        """
        stream = IncrementalDecoder(self)
        pieces = [stream.push(token) for token in t]
        pieces[-1:] = [pieces[-1] + stream.flush()] if pieces else []
        return pieces


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces as they become final.

    A piece is only handed out once it ends in a whole character, so a
    UTF-8 character split over byte-fallback tokens never comes out half.
    Decoding restarts from the last point where text was handed out (with
    the same leading-space rule for the old and the new text), so each
    token costs a few tokens' decoding, not the whole sequence's.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: List[int] = []
        self.prefix_offset = 0  # decoding starts here
        self.read_offset = 0  # text of tokens[prefix_offset:read_offset] is out

    def push(self, token: int) -> str:
        """Add one token; returns the text it completes (maybe "")."""
        self.tokens.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = decode(self.tokens[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return new_text[len(prefix_text) :]
        return ""


# Meta's Llama 3 pre-tokenizer split: contractions, letter runs with one
# leading non-letter, numbers of up to three digits, punctuation runs,
# newlines and other whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256
# Meta's names (Llama 3.1 onwards) of the first special tokens after the BPE
# ranks; the rest are <|reserved_special_token_N|>, N counting on from 2.
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
)
# Meta encodes a long text in slices, so that tiktoken never sees more than
# 400k characters at once, nor a run of more than 25k whitespace or
# non-whitespace characters (its regex would take quadratic time).
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def llama3_special_tokens() -> List[str]:
    """The 256 special tokens' names, in id order."""
    n_reserved = LLAMA3_NUM_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS)
    return list(LLAMA3_NAMED_SPECIAL_TOKENS) + [f"<|reserved_special_token_{2 + i}|>" for i in range(n_reserved)]


def read_tiktoken_ranks(model_path) -> Dict[bytes, int]:
    """The mergeable ranks of a tiktoken BPE file (`base64-token rank` per line).

    Read here rather than by tiktoken's loader, which also caches files
    under the temporary directory.
    """
    ranks: Dict[bytes, int] = {}
    with open(model_path, "rb") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as e:
                raise ValueError(
                    f"{str(model_path)!r} line {number} is not a 'base64-token rank' line: {line[:60]!r}"
                ) from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{str(model_path)!r}: the BPE ranks are not 0 .. {len(ranks) - 1}, each once")
    # Byte-level BPE starts from the single bytes. Without one, tiktoken panics (a Rust panic,
    # a BaseException that `except Exception` lets through) on the first text that holds it.
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise ValueError(
            f"{str(model_path)!r}: the BPE ranks lack {len(missing)} of the 256 single bytes ({shown}); "
            "a byte-level BPE needs a rank for every byte, or text holding a missing one cannot be encoded"
        )
    return ranks


def split_long_runs(s: str, max_run: int = MAX_NO_WHITESPACES_CHARS) -> Iterator[str]:
    """Consecutive slices of `s` in which no run of whitespace or of
    non-whitespace is longer than `max_run`: a run is cut every `max_run`
    characters, and nowhere else (Meta's slicing)."""
    start = 0
    for run in re.finditer(r"\s+|\S+", s):
        for cut in range(run.start() + max_run, run.end(), max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]


class Llama3Tokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer: tiktoken byte-level BPE with 256 special tokens.

    The special tokens take the ids after the BPE ranks (128000 onwards for
    Meta's file). `encode` reads special-token text in `s` as plain text
    unless `allowed_special` names it, so text from a user never becomes a
    control token.
    """

    kind = TIKTOKEN

    def __init__(self, model_path: str):
        import tiktoken

        check_tokenizer_file(model_path)
        mergeable_ranks = read_tiktoken_ranks(model_path)
        self.num_base_tokens = len(mergeable_ranks)
        self.special_tokens: Dict[str, int] = {
            name: self.num_base_tokens + i for i, name in enumerate(llama3_special_tokens())
        }
        try:
            self.model = tiktoken.Encoding(
                name=os.path.basename(model_path),
                pat_str=LLAMA3_PATTERN,
                mergeable_ranks=mergeable_ranks,
                special_tokens=self.special_tokens,
            )
        except ValueError as e:
            raise ValueError(f"{model_path!r} is not a usable tiktoken BPE file: {e}") from e

        self.n_words: int = self.num_base_tokens + len(self.special_tokens)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        # Generation ends at any of these.
        self.stop_tokens: List[int] = [self.eos_id, self.eom_id, self.eot_id]

    def encode(
        self,
        s: str,
        bos: bool,
        eos: bool,
        allowed_special: Union[str, AbstractSet[str]] = frozenset(),
        disallowed_special: Union[str, AbstractSet[str]] = (),
    ) -> List[int]:
        """Token ids of `s`, with <|begin_of_text|> first and <|end_of_text|> last when asked.

        Special-token text in `s` is encoded as plain text unless named in
        `allowed_special` (or "all").
        """
        check_encodable(s, "the text to encode")  # tiktoken would encode a lone surrogate as U+FFFD
        t: List[int] = []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(s[i : i + TIKTOKEN_MAX_ENCODE_CHARS]):
                t += self.model.encode(piece, allowed_special=allowed_special, disallowed_special=disallowed_special)
        if bos:
            t.insert(0, self.bos_id)
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, t) -> str:
        """Text of a list of token ids (or of a single id); a byte sequence
        that is not whole UTF-8 comes out as U+FFFD."""
        if isinstance(t, int):
            t = [t]
        return self.model.decode([int(token) for token in t])
