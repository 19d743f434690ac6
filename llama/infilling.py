"""Code Llama's infilling prompt: fill the middle between a prefix and a suffix.

The layouts are those of Meta's Code Llama (`infilling_prompt_tokens`):

    prefix-suffix-middle (PSM):  BOS <PRE> prefix <SUF> suffix <MID>      -> middle <EOT>
    suffix-prefix-middle (SPM):  BOS <PRE> <SUF> suffix <MID> prefix      -> middle <EOT>

where the prefix is encoded as ordinary text and the suffix without the
leading space SentencePiece would add (`Tokenizer.encode_infilling`), since
the suffix continues the text mid-line. Only Code Llama's 7B and 13B
tokenizers (base and Instruct) hold the pieces; 34B, 70B and Llama 2 do not.
"""

from typing import List

from llama.tokenizer import EOT_PIECE, MIDDLE_PIECE, PREFIX_PIECE, SENTENCEPIECE, SUFFIX_PIECE, IncrementalDecoder


def check_infilling_tokenizer(tokenizer) -> None:
    """Raise ValueError unless `tokenizer` has all four of Code Llama's infilling pieces."""
    pieces = {
        PREFIX_PIECE: "prefix_id",
        SUFFIX_PIECE: "suffix_id",
        MIDDLE_PIECE: "middle_id",
        EOT_PIECE: "eot_id",
    }
    # getattr: a tokenizer of another family may not define the attributes at
    # all; Llama 3's has an `eot_id`, its <|eot_id|>, but no infilling pieces.
    if getattr(tokenizer, "kind", SENTENCEPIECE) != SENTENCEPIECE:
        missing = list(pieces)
    else:
        missing = [piece for piece, attr in pieces.items() if getattr(tokenizer, attr, None) is None]
    if missing:
        raise ValueError(
            f"this tokenizer has no infilling pieces ({', '.join(missing)} missing): infilling "
            "needs the tokenizer of a Code Llama model trained for it (CodeLlama-7b, CodeLlama-13b "
            "and their Instruct models)"
        )


def infilling_prompt_tokens(tokenizer, pre: str, suf: str, suffix_first: bool = False) -> List[int]:
    """Token ids of the infilling prompt for prefix `pre` and suffix `suf`.

    Prefix-suffix-middle order, or suffix-prefix-middle with `suffix_first`
    (see the module docstring). Raises ValueError for a tokenizer without
    infilling pieces and TypeError for a non-str prefix or suffix.
    """
    check_infilling_tokenizer(tokenizer)
    for name, text in (("prefix", pre), ("suffix", suf)):
        if not isinstance(text, str):
            raise TypeError(f"an infilling {name} must be a str, got {type(text).__name__}")
    prefix = tokenizer.encode(pre, bos=False, eos=False)
    suffix = tokenizer.encode_infilling(suf)
    if suffix_first:
        return [tokenizer.bos_id, tokenizer.prefix_id, tokenizer.suffix_id] + suffix + [tokenizer.middle_id] + prefix
    return [tokenizer.bos_id, tokenizer.prefix_id] + prefix + [tokenizer.suffix_id] + suffix + [tokenizer.middle_id]


def infilling_pieces(tokenizer, t: List[int]) -> List[str]:
    """One string per token of a generated middle; they join to `decode_infilling(t)`.

    Like `Tokenizer.decode_pieces`, but the first token keeps its leading
    space: decoding starts behind the same marker `decode_infilling` uses.
    """
    stream = IncrementalDecoder(tokenizer)
    for marker_token in tokenizer._marker_ids():
        stream.push(marker_token)
    pieces = [stream.push(token) for token in t]
    pieces[-1:] = [pieces[-1] + stream.flush()] if pieces else []
    return pieces
