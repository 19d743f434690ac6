"""The public `Llama` class: build, the one decoding loop, text and chat completion."""

import contextlib
import numbers
import operator
import os
import sys
import threading
import time
import weakref
from typing import Iterator, List, Optional, Sequence, Tuple, TypedDict

import torch
import torch.nn.functional as F

from llama import checkpoint, decode_step, distributed, family, kernels, memory
from llama import quantization
from llama.chat_format import (  # noqa: F401  (re-exported: the reference defines them here)
    B_INST,
    B_SYS,
    E_INST,
    E_SYS,
    SPECIAL_TAGS,
    UNSAFE_ERROR,
    Dialog,
    Message,
    Role,
)
from llama.infilling import check_infilling_tokenizer, infilling_pieces, infilling_prompt_tokens
from llama.model import ModelArgs, Transformer
from llama.sampling import sample_next_token, sample_top_p  # noqa: F401  (sample_top_p: the reference defines it here)
from llama.tokenizer import IncrementalDecoder, Tokenizer, check_encodable, check_special_ids, tokenizer_beside


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class InfillingPrediction(TypedDict, total=False):
    generation: str
    full_text: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


def token_logprobs_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under `logits`: (bsz, seqlen, vocab), (bsz, seqlen) -> (bsz, seqlen)."""
    return -F.cross_entropy(input=logits.transpose(1, 2), target=targets, reduction="none")


def _check_sampling(temperature: float, top_p: float) -> None:
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class _Decoding:
    """The tensors of one generate() call, shared by its loop and its results."""

    def __init__(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, max_seq_len, stop_tokens, device):
        self.prompt_lens = [len(t) for t in prompt_tokens]
        self.max_gen_len = max_gen_len
        self.temperature = temperature
        self.top_p = top_p
        self.logprobs = logprobs
        bsz = len(prompt_tokens)
        self.min_prompt_len, max_prompt_len = min(self.prompt_lens), max(self.prompt_lens)
        self.total_len = min(max_seq_len, max_gen_len + max_prompt_len)

        self.tokens = torch.zeros((bsz, self.total_len), dtype=torch.long, device=device)
        for k, t in enumerate(prompt_tokens):
            self.tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        lengths = torch.tensor(self.prompt_lens, device=device)
        # True where a position holds prompt text (known from the lengths, not
        # from a pad id that a prompt might itself contain).
        self.input_text_mask = torch.arange(self.total_len, device=device)[None, :] < lengths[:, None]
        self.token_logprobs = (
            torch.zeros((bsz, self.total_len), dtype=torch.float, device=device) if logprobs else None
        )
        self.eos_reached = torch.zeros(bsz, dtype=torch.bool, device=device)
        self.stop_tokens = torch.tensor(stop_tokens, dtype=torch.long, device=device)


class _GenerationInProgress:
    """Who owns a Llama's KV cache: one generation at a time.

    A generation owns it from its start to its end. A stream owns it from
    the call that made it until it ends, is closed or is garbage collected,
    including while it is suspended between tokens. A generation started
    from another thread waits for the owner to finish; one started from
    the owner's own thread takes the cache over at once, and the stream it
    overtook raises when resumed (a thread that waited for itself would
    hang). Single decoding steps never overlap, whichever thread runs them.
    """

    def __init__(self):
        self._changed = threading.Condition()
        self._owner: Optional[_Decoding] = None
        self._owner_thread: Optional[int] = None
        self._step_running = False
        self.current: Optional[_Decoding] = None  # the latest generation to take the cache

    def claim(self, state: _Decoding) -> None:
        me = threading.get_ident()
        with self._changed:
            self._changed.wait_for(
                lambda: not self._step_running and (self._owner is None or self._owner_thread == me)
            )
            self._owner, self._owner_thread, self.current = state, me, state

    def release(self, state: _Decoding) -> None:
        with self._changed:
            if self._owner is state:
                self._owner = self._owner_thread = None
                self._changed.notify_all()

    @contextlib.contextmanager
    def stepping(self, state: _Decoding):
        """Run decoding steps of `state`: waits for any step under way; raises
        RuntimeError if a later generation has taken the cache over."""
        with self._changed:
            self._changed.wait_for(lambda: not self._step_running)
            if self.current is not state:
                raise RuntimeError(
                    "this stream was overtaken by a later generation on the same Llama, which "
                    "reused the KV cache; finish or close a stream before starting another"
                )
            self._step_running = True
        try:
            yield
        finally:
            with self._changed:
                self._step_running = False
                self._changed.notify_all()


def _process_age() -> Optional[float]:
    """Seconds since this process started (Linux's /proc), or None where that is unknown."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22, start time in clock ticks after boot; fields are counted after
            # the command's name, which ends at the last ")" and may hold spaces.
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


_IMPORTED_AT = time.time()  # where the process's start is unknown: after torch and this module loaded


class _LoadClock:
    """When the wait that build's "Loaded in" reports began: for the first build in a
    process, the process's start, since a command line's user waits for Python,
    torch, the checks and the load before the first output; for later builds,
    the call."""

    def __init__(self):
        self._built_before = False

    def wait_began(self, called_at: float) -> float:
        if self._built_before or _interactive():
            return called_at
        self._built_before = True
        age = _process_age()
        return _IMPORTED_AT if age is None else called_at - age


def _interactive() -> bool:
    """A REPL or a notebook: there the process's age is how long the session has been open,
    not a wait, so build times its own call."""
    return hasattr(sys, "ps1") or bool(sys.flags.interactive) or "IPython" in sys.modules


_LOAD_CLOCK = _LoadClock()


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: Optional[str],
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        compile: bool = False,
        fast_layout: Optional[bool] = None,
        cuda_graph: bool = False,
        mmap: bool = True,
        collective_timeout_s: Optional[float] = None,
        quantize: Optional[str] = None,
        group_size: Optional[int] = None,
        check_weights: bool = False,
    ) -> "Llama":
        """Load a Meta-format checkpoint and its tokenizer, ready to generate.

        `tokenizer_path` None takes the tokenizer.model in `ckpt_dir`, else the
        one in its parent (Meta's Llama 2 download layout), as the scripts do.

        Starts the process group and model parallelism when needed (NCCL on
        CUDA, gloo on CPU; a world of one under plain `python`), loads this
        rank's part of a checkpoint of any shard count that divides or is a
        multiple of the model-parallel size, and seeds every rank with `seed`.
        `device` defaults to this process's GPU or the CPU, `dtype` to fp16 on
        CUDA and fp32 on CPU. With `compile` the one-token decode step is
        compiled with `torch.compile`; with `cuda_graph` (CUDA only) it is
        replayed from a CUDA graph, with no compiling; `fast_layout` copies
        the matrices into their decoding layout (see `from_model`). It
        defaults to on on GPUs and on the CPU: fp32 and bf16 get the C step's
        layout where `llama/native.c` was compiled, else fp32 the transposed
        layout and bf16 oneDNN's packed one (`llama.kernels.choose_layout`
        decides). The weights then live in RAM
        rather than in the memory-mapped checkpoint (the same 1x of memory).
        `fast_layout=False` keeps Meta's layout in the mapped file; such
        weights are read from the file while decoding, so each generation
        first checks that no such file was rewritten or truncated since
        (RuntimeError). `mmap=False` copies every weight into memory, so that
        the files may change afterwards.

        `collective_timeout_s` (with more than one rank): once every rank has
        loaded, a collective that waits longer than this for a peer raises
        instead of waiting torch's 30 minutes, and rank 0 tracks which peers
        still answer (see `distributed.exit_when_a_peer_is_lost`).

        `quantize` ("int8" or "int4", with `group_size` 32, 64, 128 or 256
        for int4) quantizes the matrices tensor by tensor as they are read
        (see `llama/quantization.py`); `dtype`, the dtype of the activations,
        embeddings, norms and KV cache, then defaults to fp32 on a CPU where the
        C step (`llama/native.py`) is compiled, which reads the quantized
        matrices itself, and to bf16 elsewhere. A checkpoint
        written by `python -m llama.quantize` loads as it was quantized.

        Every weight that loading copies (converts, slices or
        moves to a GPU) is checked for NaN and inf as it is copied;
        `check_weights` also scans the ones used in place from the mapped
        file (this reads the whole checkpoint once).

        Prints "Loaded in X seconds": for the first build in a script's
        process, X is the time since the process started (Python, torch's
        import, the checks and the load: what the user waits for before the
        first output); for a later build, and in a REPL or notebook, the time
        since it was called.

        Raises FileNotFoundError for a missing directory, shard, params.json
        or tokenizer, and ValueError for anything that does not fit: a weight
        that is not finite, a KV cache larger than the memory available.
        """
        wait_began = _LOAD_CLOCK.wait_began(time.time())
        # Cheap checks first, so that a typo fails before any process group exists.
        _check_build_arguments(max_seq_len, max_batch_size, seed, collective_timeout_s)
        device = distributed.choose_device(device)
        decode_step.check_options(device, compile, cuda_graph)
        shards, params, quant = _read_checkpoint(ckpt_dir, quantize, group_size)
        dtype = _activation_dtype(device, dtype, quant)
        checkpoint.check_model_parallel_fit(
            ModelArgs.from_params(params),
            distributed.planned_model_parallel_size(model_parallel_size),
            n_shards=len(shards),
        )
        tokenizer, tokenizer_path = _read_tokenizer(ckpt_dir, tokenizer_path)
        # The family follows from the files; one that disagrees with the
        # tokenizer's fails here, before any process group or weight.
        model_family = family.detect(ckpt_dir, params, shards, tokenizer, tokenizer_path)

        model_parallel_size = _start_ranks(device, model_parallel_size, seed)
        model_args = model_family.model_args(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        model_args.vocab_size = tokenizer.n_words
        # Before any weight is read: a quantization or a cache that cannot fit fails in a moment.
        if quant is not None:
            quantization.check_fit(model_args, quant, [model_parallel_size])
        memory.check_cache_fits(model_args, model_parallel_size, device, dtype)

        mapped_files = memory.MappedFiles()
        model = _load_model(ckpt_dir, shards, model_args, model_parallel_size, device, dtype,
                            quant, params.get("quantization") is not None, mmap, mapped_files, check_weights)
        if quant is None:
            # Laid out here rather than in from_model: each matrix still in the
            # mapped shard is dropped from memory once copied, so that the
            # copy does not double the resident memory.
            layout = kernels.choose_layout(device, dtype, fast_layout=fast_layout)
            kernels.prepare(model, layout, release=memory.mapped_page_releaser(shards))
        generator = Llama._ready(model, tokenizer, compile=compile, cuda_graph=cuda_graph)
        generator._mapped_files = mapped_files.keep_used_by([*model.parameters(), *model.buffers()])
        distributed.start_collective_timeout(collective_timeout_s)
        print(f"Loaded in {time.time() - wait_began:.2f} seconds")
        return generator

    @staticmethod
    def from_model(
        model: Transformer,
        tokenizer: Tokenizer,
        compile: bool = False,
        fast_layout: Optional[bool] = None,
        cuda_graph: bool = False,
    ) -> "Llama":
        """A Llama around `model` whose weights are loaded: caches set up on the
        weights' device and dtype, ready to generate. `build` ends here; the
        benchmark starts here with weights it made in memory.

        With `fast_layout` the matrices are copied once into their decoding
        layout (`llama.kernels.choose_layout`: on GPUs q/k/v and w1/w3 fused,
        all transposed, `Transformer.prepare_for_inference`; on the CPU the C
        step's rows where it is compiled). Weights assigned from a memory-mapped file
        then live in RAM rather than in the file's pages. None (the default)
        is the choice of `llama.kernels.choose_layout` for the weights'
        device and dtype.

        With `compile`, each one-token decode step runs a `torch.compile`d
        forward with static shapes: the position is a tensor and attention
        spans the whole `max_seq_len` cache under a mask, so one compiled graph
        serves every position (one compilation per batch size; the first call
        at each takes from seconds to minutes). On CPU it uses inductor's own
        matrix templates (`max_autotune`) on frozen weights; on CUDA it also
        captures CUDA graphs (`mode="reduce-overhead"`; int8 models also get
        coordinate-descent tuning, which fuses their dequantization into the
        one-row products). Prompts still run
        the eager forward. Raises ValueError under model parallelism, which
        the compiled step does not support.

        With `cuda_graph` (CUDA only, not with `compile`), each one-token step
        replays a CUDA graph of the eager forward on the same static shapes,
        captured at the first step of each batch size (`llama/cuda_graph.py`):
        no compiling, most of `compile`'s gain on a GPU. Model parallelism is
        refused there too.
        """
        device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
        decode_step.check_options(device, compile, cuda_graph)
        check_special_ids(tokenizer)
        held = sum(b.nbytes for name, b in model.named_buffers() if name.endswith(("cache_k", "cache_v", "rope")))
        memory.check_cache_fits(
            model.params, model.model_parallel_size, device, dtype, already_held=held
        )
        if decode_step.quantized_mode(model) is None:
            # The decoding layout of this device and dtype (llama/kernels.py);
            # a quantized model's kernels are its layout already.
            kernels.prepare(model, kernels.choose_layout(device, dtype, fast_layout=fast_layout))
        return Llama._ready(model, tokenizer, compile=compile, cuda_graph=cuda_graph)

    @staticmethod
    def _ready(model: Transformer, tokenizer: Tokenizer, compile: bool, cuda_graph: bool) -> "Llama":
        """The end of `build` and `from_model`, once the weights are checked, loaded
        and laid out: the caches, eval mode and the decode step."""
        model.setup_caches()
        model.eval()
        return Llama(model, tokenizer, decode_step.choose(model, compile=compile, cuda_graph=cuda_graph))

    def __init__(self, model: Transformer, tokenizer: Tokenizer, step: Optional[decode_step.DecodeStep] = None):
        self.model = model
        # How each decoding step runs (llama/decode_step.py): eager, C, compiled or a CUDA graph.
        self.step = decode_step.DecodeStep(model) if step is None else step
        self.tokenizer = tokenizer
        # Chat format and stop tokens follow the tokenizer's family, and its version the
        # model's params (Llama 3.0 strips message content, 3.1+ keeps it, as Meta's code does).
        self.family = family.of_model(tokenizer, model.params)
        self.stop_tokens: List[int] = self.family.stop_tokens(tokenizer)
        # The generation that owns the KV cache: generations from several
        # threads take turns, and a stream left open while its own thread
        # started another generation raises instead of reading a cache that
        # now holds other tokens.
        self._in_progress = _GenerationInProgress()
        # Shard files the weights are still memory-mapped from (set by build).
        self._mapped_files: Optional[memory.MappedFiles] = None

    def _max_gen_len_or_default(self, max_gen_len: Optional[int]) -> int:
        """The completions' `max_gen_len`; None (their default, as in Meta's
        reference) means max_seq_len - 1: as long as the cache allows."""
        return self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def _forward(self, tokens: torch.Tensor, start_pos: int, last_logits_only: bool) -> torch.Tensor:
        """The model's logits for `tokens` at `start_pos`, by this Llama's decode step."""
        return self.step(tokens, start_pos, last_logits_only=last_logits_only)

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def _check_prompts(self, prompt_tokens: List[List[int]]) -> None:
        params = self.model.params
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts exceed max_batch_size {params.max_batch_size}; "
                "build with a larger max_batch_size or send fewer at a time"
            )
        for i, tokens in enumerate(prompt_tokens):
            if len(tokens) == 0:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
            if len(tokens) > params.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(tokens)} tokens, more than max_seq_len {params.max_seq_len}"
                )
            bad = [t for t in tokens if not 0 <= t < params.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt {i} holds token id {bad[0]!r}, outside the vocabulary [0, {params.vocab_size})"
                )

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt by up to `max_gen_len` tokens.

        Prompts of different lengths run as one batch: positions are filled
        from the shortest prompt on, a longer prompt's own tokens taking
        precedence over sampled ones until it ends, so each row gets the tokens
        it would get alone. Stops when every row has produced one of the
        family's stop tokens (EOS; in Llama 3 also <|eot_id|> and <|eom_id|>);
        each row is cut before its first generated stop token. With `echo` the prompt is included;
        with `logprobs` each returned token comes with log p(token | before).

        Returns (tokens per row, logprobs per row or None).
        """
        return self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)

    @torch.inference_mode()
    def _generate(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop_tokens=None):
        # `generate`, with the stop tokens as an option (infilling stops at <EOT>).
        state = self._start_decoding(prompt_tokens, max_gen_len, temperature, top_p, logprobs, stop_tokens)
        if state is None:
            return [], ([] if logprobs else None)
        try:
            with self._in_progress.stepping(state):
                for _ in self._decode_steps(state):
                    pass
        finally:
            self._in_progress.release(state)
        return self._finish_decoding(state, echo)

    def _start_decoding(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
        stop_tokens: Optional[Sequence[int]] = None,
    ) -> Optional["_Decoding"]:
        """Check the arguments, lay out the batch and take the KV cache (waiting
        for another thread's generation to end); None for an empty batch.

        Rows stop at `stop_tokens` (default: the family's, `self.stop_tokens`).
        """
        _check_sampling(temperature, top_p)
        if self._mapped_files is not None:
            self._mapped_files.check()
        if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < 0:
            raise ValueError(f"max_gen_len must be an int >= 0, got {max_gen_len!r}")
        prompt_tokens = [[_token_id(t, i) for t in prompt] for i, prompt in enumerate(prompt_tokens)]
        if not prompt_tokens:
            return None
        self._check_prompts(prompt_tokens)
        state = _Decoding(
            prompt_tokens,
            max_gen_len,
            temperature,
            top_p,
            logprobs,
            max_seq_len=self.model.params.max_seq_len,
            stop_tokens=self.stop_tokens if stop_tokens is None else stop_tokens,
            device=self.device,
        )
        self._in_progress.claim(state)
        return state

    def _decode_steps(self, state: "_Decoding") -> Iterator[int]:
        """Run the decoding loop; yields each position `cur_pos` once it is filled.

        After a yield, `state.tokens[:, cur_pos]` holds the new token of every
        row (or the row's own prompt token while the row is still in its
        prompt). The loop ends when every row has produced EOS or the
        sequence is full.
        """
        tokens, token_logprobs = state.tokens, state.token_logprobs
        prev_pos = 0
        if state.min_prompt_len == state.total_len:
            # Nothing to generate. The reference computes unshifted logprobs
            # here, and even when none were asked for.
            if state.logprobs:
                logits = self.model.forward(tokens, prev_pos)
                token_logprobs[:, 1:] = token_logprobs_of(logits[:, :-1], tokens[:, 1:])
            return

        for cur_pos in range(state.min_prompt_len, state.total_len):
            # Without logprobs only the last position's logits are needed.
            logits = self._forward(tokens[:, prev_pos:cur_pos], prev_pos, last_logits_only=not state.logprobs)
            next_token, nonfinite = sample_next_token(logits[:, -1], state.temperature, state.top_p)
            # Rows still inside their prompt keep the prompt's token.
            next_token = torch.where(state.input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if state.logprobs:
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = token_logprobs_of(
                    logits, tokens[:, prev_pos + 1 : cur_pos + 1]
                )
            state.eos_reached |= (~state.input_text_mask[:, cur_pos]) & torch.isin(next_token, state.stop_tokens)
            # The step's one wait for the device answers both questions.
            all_done, any_nonfinite = torch.stack((state.eos_reached.all(), nonfinite.any())).tolist()
            if any_nonfinite:
                # The keys and values this generation cached may hold NaN. The
                # compiled and graphed steps attend over the whole cache under a
                # mask, and a masked NaN value still makes their output NaN
                # (0 x NaN): every later generation shorter than this one would
                # fail too. Clearing here costs the healthy steps nothing.
                self.model.clear_cache(tokens.shape[0], cur_pos)
                _raise_nonfinite(logits[:, -1], nonfinite, cur_pos - state.min_prompt_len, cur_pos, state)
            prev_pos = cur_pos
            yield cur_pos
            if all_done:
                break

    def _finish_decoding(
        self, state: "_Decoding", echo: bool
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Cut each row to its answer (or prompt + answer with `echo`)."""
        all_logprobs = state.token_logprobs.tolist() if state.logprobs else None
        stop_tokens = state.stop_tokens.tolist()  # this call's: the family's, or <EOT> when infilling
        out_tokens, out_logprobs = [], []
        for i, row in enumerate(state.tokens.tolist()):
            prompt_len = state.prompt_lens[i]
            start = 0 if echo else prompt_len
            end = prompt_len + state.max_gen_len
            toks = row[start:end]
            probs = all_logprobs[i][start:end] if state.logprobs else None
            # Cut before the first *generated* stop token; one in an echoed prompt stays.
            generated = row[prompt_len:end]
            stop_at = next((k for k, token in enumerate(generated) if token in stop_tokens), None)
            if stop_at is not None:
                eos_idx = prompt_len - start + stop_at
                toks = toks[:eos_idx]
                probs = probs[:eos_idx] if state.logprobs else None
            out_tokens.append(toks)
            out_logprobs.append(probs)
        return out_tokens, (out_logprobs if state.logprobs else None)

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> List[CompletionPrediction]:
        """Complete each prompt; returns one CompletionPrediction per prompt."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings; wrap a single prompt in a list")
        for i, prompt in enumerate(prompts):
            check_encodable(prompt, f"prompt {i}")
        max_gen_len = self._max_gen_len_or_default(max_gen_len)
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens=prompt_tokens,
            max_gen_len=max_gen_len,
            temperature=temperature,
            top_p=top_p,
            logprobs=logprobs,
            echo=echo,
        )
        return [
            self._prediction(self.tokenizer.decode(t), t, generation_logprobs, i)
            for i, t in enumerate(generation_tokens)
        ]

    def text_infilling(
        self,
        prefixes: List[str],
        suffixes: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        suffix_first: bool = False,
    ) -> List[InfillingPrediction]:
        """Fill in the middle between each prefix and its suffix (Code Llama 7B and 13B).

        The prompt is laid out prefix-suffix-middle, or suffix-prefix-middle
        with `suffix_first` (`llama.infilling`); each row stops at the
        tokenizer's <EOT>. Returns one InfillingPrediction per pair:
        `generation` (the middle) and `full_text` (prefix + middle + suffix),
        with `tokens` and `logprobs` when asked. Raises ValueError for a
        tokenizer without Code Llama's infilling pieces, for prefixes and
        suffixes of different counts, and as `generate` does.
        """
        check_infilling_tokenizer(self.tokenizer)
        for name, texts in (("prefixes", prefixes), ("suffixes", suffixes)):
            if isinstance(texts, str):
                raise ValueError(f"{name} must be a list of strings; wrap a single one in a list")
        prefixes, suffixes = list(prefixes), list(suffixes)
        if len(prefixes) != len(suffixes):
            raise ValueError(f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes; give one suffix per prefix")
        max_gen_len = self._max_gen_len_or_default(max_gen_len)
        prompt_tokens = [
            infilling_prompt_tokens(self.tokenizer, prefix, suffix, suffix_first=suffix_first)
            for prefix, suffix in zip(prefixes, suffixes)
        ]
        generation_tokens, generation_logprobs = self._generate(
            prompt_tokens,
            max_gen_len,
            temperature,
            top_p,
            logprobs,
            echo=False,
            stop_tokens=[self.tokenizer.eot_id],
        )
        predictions = []
        for i, (prefix, suffix, t) in enumerate(zip(prefixes, suffixes, generation_tokens)):
            generation = self.tokenizer.decode_infilling(t)
            prediction = {"generation": generation, "full_text": prefix + generation + suffix}
            if logprobs:
                prediction["tokens"] = infilling_pieces(self.tokenizer, t)
                prediction["logprobs"] = generation_logprobs[i]
            predictions.append(prediction)
        return predictions

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant; returns one ChatPrediction per dialog.

        The prompt is in the model family's chat format (`llama.family`). In
        Llama 2's, a dialog whose messages hold the format's own tags ([INST],
        <<SYS>>, ...) is answered with UNSAFE_ERROR; Llama 3 encodes such text
        as plain text. Raises ValueError for a dialog the format cannot encode
        (empty, wrong role order, ending with the assistant).
        """
        _check_sampling(temperature, top_p)
        max_gen_len = self._max_gen_len_or_default(max_gen_len)
        prompt_tokens = []
        for i, dialog in enumerate(dialogs):
            try:
                prompt_tokens.append(self.family.encode_dialog(self.tokenizer, dialog))
            except (ValueError, TypeError) as e:
                raise type(e)(f"dialog {i}: {e}") from e
        unsafe_requests = [self.family.refuses(dialog) for dialog in dialogs]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens=prompt_tokens,
            max_gen_len=max_gen_len,
            temperature=temperature,
            top_p=top_p,
            logprobs=logprobs,
        )
        return [
            self._prediction(
                {"role": "assistant", "content": UNSAFE_ERROR if unsafe else self.tokenizer.decode(t)},
                t,
                generation_logprobs,
                i,
            )
            for i, (t, unsafe) in enumerate(zip(generation_tokens, unsafe_requests))
        ]

    def stream_generate(
        self,
        prompt_tokens: List[int],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
    ) -> Iterator[int]:
        """Continue one prompt (a list of token ids), yielding each new token id as it is sampled.

        Runs the same decoding loop as `generate`, so for the same seed it
        yields exactly `generate([prompt_tokens], ...)[0][0]` (the tokens
        before the stop token) and draws the same random numbers. Ends at a
        stop token (not yielded) or after `max_gen_len` tokens; the caller may stop earlier
        by leaving the loop or calling `.close()`. Arguments are checked
        here, before the first token: raises ValueError as `generate` does.
        The stream holds this Llama until it ends or is closed (or garbage
        collected): another thread's generation waits for it, and a
        generation started from this thread meanwhile overtakes it, after
        which it raises RuntimeError when resumed, since the KV cache moved on.
        """
        if not isinstance(prompt_tokens, (list, tuple)) or any(isinstance(t, (list, tuple)) for t in prompt_tokens):
            raise ValueError("stream_generate takes one prompt, a list of token ids; call it once per prompt")
        with torch.inference_mode():
            state = self._start_decoding([prompt_tokens], max_gen_len, temperature, top_p, logprobs=False)
        stream = self._stream_tokens(state)
        # A stream dropped before its first token never runs its `finally`.
        weakref.finalize(stream, self._in_progress.release, state)
        return stream

    def _stream_tokens(self, state: "_Decoding") -> Iterator[int]:
        steps = self._decode_steps(state)
        try:
            while True:
                # Inference mode around each step, never across the yield: the
                # caller's code between tokens runs in its own mode. (torch's
                # decorator would do the same for a generator function; spelled
                # out here so that it does not depend on that.)
                with self._in_progress.stepping(state), torch.inference_mode():
                    cur_pos = next(steps, None)
                    ended = cur_pos is None or bool(state.eos_reached[0])
                    token = None if ended else int(state.tokens[0, cur_pos])
                if ended:
                    return
                yield token
        finally:
            self._in_progress.release(state)

    def _stream_text(self, token_stream: Iterator[int]) -> Iterator[str]:
        # One piece per token ("" while a character is still incomplete), and
        # at the end whatever an unfinished character leaves, as decode() would.
        decoder = IncrementalDecoder(self.tokenizer)
        try:
            for token in token_stream:
                yield decoder.push(token)
            rest = decoder.flush()
            if rest:
                yield rest
        finally:
            token_stream.close()

    def stream_text_completion(
        self,
        prompt: str,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
    ) -> Iterator[str]:
        """Complete one prompt, yielding text pieces as each token is sampled.

        Yields one str per generated token, "" while a character spread over
        byte tokens is incomplete (so no piece holds half a character); the
        pieces join to `text_completion([prompt], ...)[0]["generation"]` for
        the same seed. Stops as `stream_generate` does. Raises ValueError for
        a non-str prompt or bad arguments, before the first piece.
        """
        if not isinstance(prompt, str):
            raise ValueError(
                f"stream_text_completion takes one prompt str, got {type(prompt).__name__}; "
                "call it once per prompt"
            )
        check_encodable(prompt, "the prompt")
        max_gen_len = self._max_gen_len_or_default(max_gen_len)
        prompt_tokens = self.tokenizer.encode(prompt, bos=True, eos=False)
        return self._stream_text(self.stream_generate(prompt_tokens, max_gen_len, temperature, top_p))

    def stream_chat_completion(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
    ) -> Iterator[str]:
        """Answer one dialog as the assistant, yielding text pieces as each token is sampled.

        The pieces join to `chat_completion([dialog], ...)[0]["generation"]["content"]`
        for the same seed. As there, a dialog holding the format's own tags is
        answered with UNSAFE_ERROR, yielded once after the tokens have been
        drawn (so the random state moves on as in `chat_completion`). Raises
        ValueError for a dialog the format cannot encode, before the first piece.
        """
        max_gen_len = self._max_gen_len_or_default(max_gen_len)
        prompt_tokens = self.family.encode_dialog(self.tokenizer, dialog)
        token_stream = self.stream_generate(prompt_tokens, max_gen_len, temperature, top_p)
        if self.family.refuses(dialog):
            return self._stream_unsafe(token_stream)
        return self._stream_text(token_stream)

    @staticmethod
    def _stream_unsafe(token_stream: Iterator[int]) -> Iterator[str]:
        for _ in token_stream:
            pass
        yield UNSAFE_ERROR

    def _prediction(self, generation, tokens: List[int], logprobs: Optional[List[List[float]]], i: int):
        # The one place a result dict is built, for text and chat alike.
        if logprobs is None:
            return {"generation": generation}
        return {
            "generation": generation,
            "tokens": self.tokenizer.decode_pieces(tokens),
            "logprobs": logprobs[i],
        }


# Llama.build's steps, in its order.


def _check_build_arguments(max_seq_len, max_batch_size, seed, collective_timeout_s) -> None:
    for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_seed(seed)
    distributed.check_launch_variables()
    distributed.check_collective_timeout(collective_timeout_s)


def _read_checkpoint(ckpt_dir, quantize: Optional[str], group_size: Optional[int]):
    """(shards, params, the quantization the model will have or None). Raises
    ValueError for a quantization other than the one the checkpoint holds."""
    requested = quantization.make_config(quantize, group_size)
    shards = checkpoint.find_shards(ckpt_dir)
    params = checkpoint.read_params(ckpt_dir)
    stored = quantization.config_from_params(params, f"{str(ckpt_dir)!r}/params.json")
    if stored is not None and requested is not None and (
        requested.mode != stored.mode or group_size not in (None, stored.group_size)
    ):
        raise ValueError(
            f"{str(ckpt_dir)!r} is already quantized ({stored.describe()}); build it with "
            f"quantize=None or quantize={stored.mode!r}{'' if stored.group_size is None else f', group_size={stored.group_size}'}"
        )
    return shards, params, stored or requested


def _activation_dtype(device: torch.device, dtype: Optional[torch.dtype], quant) -> torch.dtype:
    """The dtype asked for, or the device's (a quantized model's) default; raises
    where the quantized kernels cannot run in it."""
    if quant is not None and dtype is None:
        dtype = quantization.default_dtype(device)
    dtype = distributed.choose_dtype(device, dtype)
    if quant is not None:
        kernels.check_kernel(quant.mode, device, dtype)
    return dtype


def _read_tokenizer(ckpt_dir, tokenizer_path):
    """(Tokenizer, its path): the one given, else the one beside the checkpoint.
    Raises ValueError for one without the BOS and EOS ids decoding needs."""
    if tokenizer_path is None:
        tokenizer_path = tokenizer_beside(ckpt_dir)
        if tokenizer_path is None:
            raise FileNotFoundError(f"no tokenizer.model in {str(ckpt_dir)!r} or its parent; pass tokenizer_path")
    tokenizer = Tokenizer(model_path=str(tokenizer_path))
    check_special_ids(tokenizer)
    return tokenizer, tokenizer_path


def _start_ranks(device: torch.device, model_parallel_size: Optional[int], seed: int) -> int:
    """Start the process group (a world of one under plain python); returns the model-parallel size."""
    model_parallel_size = distributed.init_distributed(device, model_parallel_size)
    distributed.relax_collective_timeout()  # loading may take long on some ranks
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The seed must be the same on all ranks: they sample the same tokens.
    torch.manual_seed(seed)
    distributed.silence_other_ranks()
    return model_parallel_size


def _load_model(ckpt_dir, shards, model_args, model_parallel_size, device, dtype, quant, quantized_in_files: bool,
                mmap: bool, mapped_files, check_weights: bool) -> Transformer:
    """This rank's weights cut out of the shards (any shard count loads on any
    model-parallel size that divides it or that it divides; quantized as each
    tensor is read, unless the files hold them quantized) and assigned to a
    `Transformer` built on meta."""
    stored = quant if quantized_in_files else None
    requested = None if quantized_in_files else quant
    state_dict = checkpoint.load_for_rank(
        shards,
        distributed.model_parallel_rank(),
        model_parallel_size,
        model_args,
        device=device,
        dtype=dtype,
        progress=distributed.is_first_rank(),
        mmap=mmap,
        mapped_files=mapped_files,
        quant=stored,
        convert=None if requested is None else quantization.converter(requested, dtype, model_parallel_size),
        check_all_weights=check_weights,
    )
    with checkpoint.init_on_meta():
        model = Transformer(model_args)
    if quant is not None:
        quantization.install(model, state_dict, quant, device, dtype)
    else:
        checkpoint.load_into(model, state_dict, device, dtype, source=str(ckpt_dir))
    return model


# torch.manual_seed takes a signed or unsigned 64-bit seed.
TORCH_SEEDS = range(-(2**63), 2**64)


def check_seed(seed) -> None:
    """Raise ValueError unless `seed` is an integer torch.manual_seed takes."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) not in TORCH_SEEDS:
        raise ValueError(f"seed must be an integer from -2**63 to 2**64 - 1 (torch's 64-bit seeds), got {seed!r}")


def _token_id(token, prompt_index: int) -> int:
    """`token` as a Python int: ints, numpy and torch integers are accepted."""
    if isinstance(token, bool) or (isinstance(token, torch.Tensor) and token.dtype == torch.bool):
        raise TypeError(f"prompt {prompt_index} holds {token!r}: token ids must be integers, not bools")
    try:
        return operator.index(token)
    except TypeError:
        raise TypeError(
            f"prompt {prompt_index} holds {token!r} ({type(token).__name__}): token ids must be integers"
        ) from None


def _raise_nonfinite(logits, nonfinite, step: int, position: int, state: _Decoding) -> None:
    """Raise FloatingPointError for the first row whose logits (bsz, vocab) are not finite."""
    row = int(nonfinite.nonzero()[0, 0])
    values = logits[row]
    n_nan, n_inf = int(values.isnan().sum()), int(values.isinf().sum())
    if n_nan or n_inf:
        what = f"the logits are not finite ({n_nan} NaN, {n_inf} infinite of {values.numel()})"
    else:
        what = f"the logits / temperature {state.temperature} overflow float32"
    raise FloatingPointError(
        f"decoding step {step} (position {position}), row {row} of the batch: {what}; the "
        "weights may hold NaN or inf (build(check_weights=True) scans them all), or the "
        "activations overflowed the model's dtype"
    )
