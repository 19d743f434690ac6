"""SentencePiece tokenizer, as Meta's reference wraps it."""

import os
from typing import List, Optional, Sequence

from sentencepiece import SentencePieceProcessor


# Code Llama's infilling pieces: prefix, suffix, middle and end of infilling.
PREFIX_PIECE, SUFFIX_PIECE, MIDDLE_PIECE, EOT_PIECE = "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"
# Encoded before text that must not get a leading space, then dropped (Meta's trick).
_INFILL_MARKER = "☺"


class Tokenizer:
    """Encodes text to token ids and back with a SentencePiece model."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path!r}")
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
        if not isinstance(s, str):
            raise TypeError(f"can only encode a str, got {type(s).__name__}")
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
        if not isinstance(s, str):
            raise TypeError(f"can only encode a str, got {type(s).__name__}")
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
